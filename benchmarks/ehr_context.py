"""EHR benchmark: evidence recall of budgeted contexts, and memory of streamed FHIR NDJSON ingestion.

Recall: synthetic patients (`medgem.ehr.synth`), each QA item's evidence (resources or sections)
checked against the context built for its question, counted with the embedded model's tokenizer,
at budgets of 1k, 2k and 4k tokens. Rankers: BM25, BM25+MiniLM (hybrid), and the peer that needs
no retrieval at all: the most recent entries first.

Streaming: a Bulk Data NDJSON file of --stream-resources resources (notes padded so the file is
about --stream-mb MB), read in a fresh subprocess by `load_record(..., patient_id=...)` (which
validates every resource in the file and keeps one patient's events) and, as the peer, by the naive
`json.loads` of every line into a list. Peak RSS of each process is reported. Writes benchmarks/results/ehr_context.json.

    python benchmarks/ehr_context.py                         # everything (the stream part takes minutes)
    python benchmarks/ehr_context.py --skip-stream --questions 200
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGETS = (1000, 2000, 4000)
FILLER = (
    "Discharge summary. Admitted with community acquired pneumonia, treated with ceftriaxone and "
    "azithromycin, improved on oral antibiotics. Creatinine rose to 1.8 mg/dL and recovered with fluids. "
)


def recall(patients: int, questions: int, seed: int) -> dict:

    from medgem.ehr.context import ContextBuilder, Retriever
    from medgem.ehr.embed import MiniLM
    from medgem.ehr.qa import evidence_found
    from medgem.ehr.synth import generate
    from medgem.ehr.timeline import Timeline
    from medgem.inputs.fhir import load_record
    from medgem.processing.tokenizer import Tokenizer
    from medgem.weights import embedded_gguf, gguf_reader, medgem_home

    tokenizer = Tokenizer.from_gguf(gguf_reader.GGUFIndex.load(embedded_gguf()), medgem_home() / "tokenizers")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_bos=False))

    class Recency(Retriever):
        """The peer: no relevance at all, the newest entries first."""

        def rank(self, question: str) -> list[int]:
            return sorted(range(len(self.chunks)), key=lambda i: self.chunks[i].when, reverse=True)

    embedder = MiniLM()
    hits = {name: dict.fromkeys(BUDGETS, 0) for name in ("bm25", "hybrid", "recency")}
    seconds = dict.fromkeys(hits, 0.0)
    n = 0
    context_tokens = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in generate(patients, seed):
            if n >= questions:
                break
            path = Path(tmp) / "bundle.json"
            path.write_text(json.dumps(p.bundle))
            timeline = Timeline(load_record(path))
            builders = {"bm25": ContextBuilder(timeline, count), "hybrid": ContextBuilder(timeline, count, embedder),
                        "recency": ContextBuilder(timeline, count)}  # fmt: skip
            builders["recency"].retriever = Recency(builders["recency"].chunks)
            context_tokens.append(count(timeline.render()))
            for item in p.qa[: questions - n]:
                for name, builder in builders.items():
                    start = time.perf_counter()
                    for budget in BUDGETS:
                        hits[name][budget] += evidence_found(item, builder.build(item["question"], budget))
                    seconds[name] += time.perf_counter() - start
                n += 1
    return {
        "questions": n,
        "full_timeline_tokens": {"median": sorted(context_tokens)[len(context_tokens) // 2], "max": max(context_tokens)},
        "recall": {name: {str(b): round(h / n, 4) for b, h in by_budget.items()} for name, by_budget in hits.items()},
        "ms_per_question_all_budgets": {name: round(1000 * s / n, 1) for name, s in seconds.items()},
    }


def write_export(path: Path, resources: int, megabytes: int, seed: int) -> tuple[int, str]:
    """An NDJSON export of at least `resources` resources, notes padded towards `megabytes`."""
    from medgem.ehr.synth import make_patient

    written, last_patient, index = 0, "", 0
    per_resource = megabytes * 1e6 / resources  # bytes per resource the file should average
    with path.open("w") as f:
        while written < resources:
            p = make_patient(seed, index, ref_style="relative")
            lines = [json.dumps(entry["resource"]) for entry in p.bundle["entry"]]
            pad = max(0, int(per_resource * (len(lines) + 1)) - sum(len(line) + 1 for line in lines))
            note = (FILLER * (1 + pad * 3 // 4 // len(FILLER))).encode()  # base64 grows it by 4/3
            lines.append(json.dumps({"resourceType": "DocumentReference", "id": f"long-{index}", "status": "current",
                                     "subject": {"reference": f"Patient/{p.id}"}, "date": "2024-01-01T00:00:00Z",
                                     "content": [{"attachment": {"contentType": "text/plain",
                                                                 "data": base64.b64encode(note).decode()}}]}))  # fmt: skip
            f.write("\n".join(lines) + "\n")
            written += len(lines)
            last_patient, index = p.id, index + 1
    return written, last_patient


_CHILD = {
    "load_record": "from medgem.inputs.fhir import load_record; r = load_record(PATH, patient_id=PID); "
    "out = {'events': len(r.events)}",
    "peer_json_list": "import json; rows = [json.loads(line) for line in open(PATH)]; out = {'resources': len(rows)}",
}


def stream(resources: int, megabytes: int, seed: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.ndjson"
        start = time.perf_counter()
        written, patient = write_export(path, resources, megabytes, seed)
        results["file"] = {"resources": written, "megabytes": round(path.stat().st_size / 1e6, 1),
                           "write_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        for name, body in _CHILD.items():
            code = (f"import json, resource, time\nPATH, PID = {str(path)!r}, {patient!r}\nt = time.perf_counter()\n"
                    f"{body}\nout['seconds'] = round(time.perf_counter() - t, 1)\n"
                    "out['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)\n"
                    "print(json.dumps(out))")  # fmt: skip
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
            print(name, results[name], file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--stream-resources", type=int, default=100_000)
    parser.add_argument("--stream-mb", type=int, default=200)
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    args = parser.parse_args()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "command": " ".join(sys.argv)}  # fmt: skip
    if not args.skip_recall:
        out["context"] = recall(args.patients, args.questions, args.seed)
        print(json.dumps(out["context"], indent=2), file=sys.stderr)
    if not args.skip_stream:
        out["stream"] = stream(args.stream_resources, args.stream_mb, args.seed)
    RESULTS.mkdir(exist_ok=True)
    name = "ehr_context.json" if not (args.skip_stream or args.skip_recall) else (
        "ehr_context_recall.json" if args.skip_stream else "ehr_context_stream.json")  # fmt: skip
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
