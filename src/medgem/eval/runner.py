"""Running a task against a model: batched, resumable, then scored, split by subgroup and reported.

The output folder is the cache. `run.json` records the settings that decide a model output (task,
data hash, model, method, prompt version...); `predictions.jsonl` gets one line per finished item,
appended and flushed batch by batch. A rerun into the same folder reads both, refuses settings that
changed, and asks the model only for the items that have no line yet. A line cut short by a kill
is ignored and recomputed. When every item is done the file is rewritten with the scored rows.

The model is any object with `generate_batch(prompts, max_new_tokens=, temperature=, stop=, raw=)`
(prompts are strings or message lists) and, for `method="loglik"`, `score(prompt, continuations)`
(summed token log-probs of each continuation) plus `tokenizer.encode` (to count tokens). Log-likelihood
is deterministic: no sampling and no answer parsing. `method="agent"` (EHR-QA on FHIR files) answers
through the records agent (ehr/agent.py, which needs a medgem Pipeline), scores the answers exactly as
`generate` does, and writes each question's tool transcript to `transcripts/<id>.json`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgem.errors import CapabilityError, InputError
from medgem.eval import prompts, scoring
from medgem.eval.metrics import estimate, seeded_rng, softmax
from medgem.eval.report import plain, write_json, write_report
from medgem.eval.subgroups import check_columns, subgroup_report
from medgem.eval.tasks import Item, Task
from medgem.notice import NOTICE

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = {"mcq": 16, "vqa": 32, "classify": 48, "report": 256, "ehrqa": 16}  # ehrqa: as `medgem ehr`


@dataclass
class RunConfig:
    """How to run; `settings()` is the part that decides model outputs and so must match on resume."""

    method: str = "generate"  # or "loglik", or "agent" (EHR-QA from FHIR files)
    model_name: str = "embedded"
    limit: int | None = None  # the first N items
    seed: int = 0  # bootstrap resampling
    batch_size: int = 8
    max_new_tokens: int | None = None  # default per task kind
    chat: bool = False  # wrap text prompts in a user turn (instruction-tuned models)
    subgroups: list[str] = field(default_factory=list)
    n_boot: int = 1000
    threshold: float = 0.5  # classification decision threshold
    budget: int = 2048  # EHR-QA: prompt tokens for a record read from a FHIR file
    agent_steps: int = 4  # EHR-QA agent: most model turns per question (the budget is split over the results)
    progress: bool = True

    def validate(self, task: Task) -> list[Item]:
        """The items to run, once every setting is checked (callers do it before loading a model)."""
        if self.method not in ("generate", "loglik", "agent"):
            raise InputError(f"--method must be generate, loglik or agent, got {self.method!r}")
        if self.method == "loglik" and task.kind not in ("mcq", "classify"):
            raise InputError(f"--method loglik scores options; task '{task.name}' has none (use generate)")
        if self.method == "agent" and (task.kind != "ehrqa" or not all(it.record for it in task.items)):
            raise InputError("--method agent calls tools over FHIR files: it needs an EHR-QA set whose items "
                             "name a 'bundle' (as `medgem ehr synth` writes)")
        if self.method == "agent" and self.agent_steps < 2:
            raise InputError(f"--agent-steps must be at least 2 (a call and an answer), got {self.agent_steps}")
        for flag, value in (("--limit", self.limit or 1), ("--batch-size", self.batch_size), ("--n-boot", self.n_boot)):
            if value < 1:
                raise InputError(f"{flag} must be at least 1, got {value}")
        items = task.items[: self.limit] if self.limit else task.items
        check_columns([it.meta for it in items], self.subgroups)
        return items

    def settings(self, task: Task) -> dict[str, Any]:
        return {
            "task": task.name, "data_sha256": task.sha256(), "model": self.model_name, "method": self.method,
            "max_new_tokens": self.max_new_tokens or MAX_NEW_TOKENS[task.kind], "chat": self.chat,
            "prompt_version": prompts.PROMPT_VERSION, **({"budget": self.budget} if task.kind == "ehrqa" else {}),
            **({"agent_steps": self.agent_steps} if self.method == "agent" else {}),
        }


class PredictionCache:
    """Raw outputs by item id, backed by an append-only predictions.jsonl guarded by run.json."""

    def __init__(self, out: Path, settings: dict[str, Any]):
        self.path, self.raw = out / "predictions.jsonl", {}
        manifest = out / "run.json"
        if manifest.is_file():
            try:
                before = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{manifest} is not valid JSON; use a fresh --out folder") from None
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            if changed:
                raise InputError(f"{out} holds a run with different {', '.join(changed)}; "
                                 "use a fresh --out folder (or the same settings to resume)")
        elif self.path.exists():
            raise InputError(f"{self.path} exists without run.json; use a fresh --out folder")
        else:
            write_json(manifest, settings)
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.raw[str(rec["id"])] = rec["raw"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that item is recomputed
            # Rewrite without any torn line so later appends start on a fresh line.
            self._rewrite([{"id": k, "raw": v} for k, v in self.raw.items()])

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.raw

    def add(self, pairs: list[tuple[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for item_id, raw in pairs:
                f.write(json.dumps({"id": item_id, "raw": plain(raw)}) + "\n")
                self.raw[item_id] = raw
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(plain(r)) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Replace the cache with full rows (raw output kept, so a later resume still finds it)."""
        self._rewrite([{**r, "raw": self.raw[r["id"]]} for r in rows])


def _text_input(text: str, chat: bool) -> str | list[dict[str, Any]]:
    return [{"role": "user", "content": text}] if chat else text


def _ehr_prompt(item: Item, asker: Any) -> str:
    """The `medgem ehr` prompt: the record (inline, or built from the FHIR file within the budget)."""
    from medgem.ehr.qa import ANSWER_TYPES, build_prompt

    kind = item.answer_type if item.answer_type in ANSWER_TYPES else None
    if item.record:
        return asker.prompt(item.record, item.question, kind)[0]
    return build_prompt(item.context, item.question, kind)


def _generate(model: Any, task: Task, batch: list[Item], cfg: RunConfig, asker: Any = None) -> list[str]:
    stop: list[str] = []
    if task.kind == "mcq":
        inputs = [_text_input(prompts.mcq_prompt(it), cfg.chat) for it in batch]
        stop = prompts.MCQ_STOP
    elif task.kind == "ehrqa":
        from medgem.ehr.qa import STOP

        inputs = [_text_input(_ehr_prompt(it, asker), cfg.chat) for it in batch]
        stop = STOP
    elif task.kind == "vqa":
        inputs = [prompts.vqa_messages(it) for it in batch]
        stop = ["\n\n"]
    elif task.kind == "classify":
        inputs = [prompts.classify_messages(it, task.labels, task.multi_label) for it in batch]
    else:
        inputs = [prompts.report_messages(it) for it in batch]
    outs = model.generate_batch(
        inputs, max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS[task.kind], temperature=0.0, stop=stop,
        raw=isinstance(inputs[0], str),  # plain text goes in as written, messages through the chat template
    )
    if len(outs) != len(inputs):
        raise RuntimeError(f"model returned {len(outs)} outputs for {len(inputs)} prompts")
    return [str(o) for o in outs]


def _agent(agent: Any, batch: list[Item], out: Path) -> list[str]:
    """The records agent's answers, with each question's transcript written next to the predictions."""
    from medgem.ehr.agent import transcript_name

    results = agent.ask_batch([(it.record, it.question, it.answer_type) for it in batch])
    folder = out / "transcripts"
    folder.mkdir(exist_ok=True)
    for it, result in zip(batch, results, strict=True):
        write_json(folder / transcript_name(it.id), {"id": it.id, **result.transcript()})
    return [r.answer for r in results]


def _scores_images(model: Any) -> bool:
    """Whether `score` takes messages (so images): a multimodal model whose score() is not typed `str`."""
    if not (getattr(model, "supports_images", False) and hasattr(model, "score")):
        return False
    first = next(iter(inspect.signature(model.score).parameters.values()), None)
    return first is not None and first.annotation not in (str, "str")


def _image_score(model: Any, messages: list[dict[str, Any]], continuations: list[str]) -> list[float]:
    if not _scores_images(model):
        raise CapabilityError("log-likelihood on image tasks needs a multimodal model whose score() takes "
                              "messages; use --method generate")
    return [float(x) for x in model.score(messages, continuations)]


def _loglik(model: Any, task: Task, item: Item, cfg: RunConfig) -> dict[str, Any]:
    if task.kind == "mcq":
        if not hasattr(model, "score"):
            raise CapabilityError("this model has no score(); use --method generate")
        prompt = prompts.cloze_prompt(item)
        conts = prompts.mcq_continuations(item)
        if cfg.chat:  # score() adds <bos> itself; a model turn starts on a fresh line, without a space
            prompt = model.tokenizer.apply_chat_template(_text_input(prompt, True)).removeprefix("<bos>")
            conts = {k: v.lstrip() for k, v in conts.items()}
        sums = model.score(prompt, list(conts.values()))
        # Token counts for the per-token mean, split as score() splits: the continuation encoded alone.
        counts = [len(model.tokenizer.encode(c, add_bos=False)) for c in conts.values()]
        return {"logprob": dict(zip(conts, map(float, sums))), "ntokens": dict(zip(conts, counts))}
    if task.multi_label:  # one yes/no question per label; P(yes) among {yes, no}
        probs = {lab: float(softmax(_image_score(model, prompts.label_question(item, lab), [" yes", " no"]))[0])
                 for lab in task.labels}
    else:
        msgs = prompts.classify_messages(item, task.labels, multi_label=False)
        probs = dict(zip(task.labels, softmax(_image_score(model, msgs, [f" {lab}" for lab in task.labels]))
                         .tolist()))
    return {"probs": probs}


def evaluate(task: Task, model: Any, out_dir: str | Path, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Run (or resume) `task` on `model`, write results.json, report.html and predictions.jsonl."""
    from tqdm import tqdm

    cfg = cfg or RunConfig()
    items = cfg.validate(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.settings(task)
    cache = PredictionCache(out, settings)
    todo = [it for it in items if it.id not in cache]
    asker = agent = None
    if cfg.method == "agent" and todo:
        from medgem.ehr.agent import RecordsAgent

        agent = RecordsAgent(model, max_steps=cfg.agent_steps, result_tokens=cfg.budget // cfg.agent_steps)
    elif task.kind == "ehrqa" and any(it.record for it in todo):
        from medgem.ehr.qa import Asker

        asker = Asker(lambda text: len(model.tokenizer.encode(text, add_bos=False)), cfg.budget)
    log.info("eval %s: %d items, %d cached, %d to run", task.name, len(items), len(items) - len(todo), len(todo))
    started = time.perf_counter()
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"eval {task.name}", unit="item",
              disable=not cfg.progress) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start: start + cfg.batch_size]
            if cfg.method == "agent":
                raw = _agent(agent, batch, out)
            elif cfg.method == "generate":
                raw = _generate(model, task, batch, cfg, asker)
            else:
                raw = [_loglik(model, task, it, cfg) for it in batch]
            cache.add([(it.id, r) for it, r in zip(batch, raw)])
            bar.update(len(batch))
    elapsed = time.perf_counter() - started

    scored = scoring.score(task, items, [cache.raw[it.id] for it in items], cfg.method, cfg.threshold)
    idx = np.arange(len(items))
    headline = {name: estimate(fn, idx, cfg.n_boot, seeded_rng(cfg.seed, "headline", name))[0].as_dict()
                for name, fn in scored.metrics.items()}
    groups = subgroup_report(scored.metrics, [it.meta for it in items], cfg.subgroups,
                             n_boot=cfg.n_boot, seed=cfg.seed) if cfg.subgroups else []
    for row, it in zip(scored.rows, items):
        row["meta"] = it.meta
    cache.finish(scored.rows)
    results = {
        "task": task.name, "kind": task.kind, "data": str(task.path), "model": cfg.model_name,
        "method": cfg.method, "n_items": len(items), "computed_now": len(todo), "seconds_computing": round(elapsed, 2),
        "seed": cfg.seed, "n_boot": cfg.n_boot, "primary": scored.primary, "metrics": headline,
        "extra": scored.extra, "subgroups": groups, "settings": settings, "notice": NOTICE,
    }
    write_report(out, results, scored)
    return plain(results)
