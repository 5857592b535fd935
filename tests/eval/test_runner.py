"""The runner end to end with a scripted model: known metrics, batching, resume, limits, outputs."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medgem.errors import CapabilityError, InputError
from medgem.eval.runner import RunConfig, evaluate
from medgem.eval.tasks import load_task
from medgem.notice import NOTICE

FORMATS = ["The answer is ({}).", "**{}**", "Answer: {}", "{}) because", "I think it's option {}, not X"]


@pytest.fixture
def mcq_task():
    return load_task("medqa", "handwritten")


def _by_question(task):
    return {it.question: it for it in task.items}


def _mcq_reply(task, ask):
    """Right on even-numbered items (in varied formats), a wrong letter on the odd ones."""
    items = _by_question(task)
    order = {it.id: i for i, it in enumerate(task.items)}

    def reply(prompt):
        it = items[ask(prompt)]
        i = order[it.id]
        letter = it.answer if i % 2 == 0 else "ABCD"[("ABCD".index(it.answer) + 1) % 4]
        if i % 10 == 4:  # the option's own text, no letter
            return f" {it.options[letter]}"
        return " " + FORMATS[i % len(FORMATS)].format(letter).replace("X", "Z")

    return reply


def test_mcq_generate_scores_the_known_answers(tmp_path, mcq_task, scripted, ask):
    model = scripted(_mcq_reply(mcq_task, ask))
    res = evaluate(mcq_task, model, tmp_path, RunConfig(batch_size=8, n_boot=200, progress=False))
    n = len(mcq_task.items)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(0.5)
    assert res["metrics"]["accuracy"]["low"] < 0.5 < res["metrics"]["accuracy"]["high"]
    assert res["extra"]["unparsed"] == 0 and res["extra"]["chance"] == 0.25
    assert model.calls == -(-n // 8) and len(model.prompts) == n
    assert all(k["temperature"] == 0.0 and k["raw"] is True and "\n\n" in k["stop"] for k in model.kwargs)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == n and sum(r["correct"] for r in rows) == n // 2
    assert rows[0]["meta"]["topic"] and "raw" in rows[0]
    html = (tmp_path / "report.html").read_text()
    assert NOTICE in html and "confusion.png" in html and (tmp_path / "confusion.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == res["metrics"] and saved["notice"] == NOTICE


def test_mcq_loglik_sum_and_per_token_mean(tmp_path, mcq_task, scripted, ask):
    """First half: the right option scores 0, the others -3 per word. Second half: every option scores
    -1 per word, so the sum picks the shortest option and the per-token mean ties them all (A wins)."""
    items = _by_question(mcq_task)
    first_half = {it.id for it in mcq_task.items[: len(mcq_task.items) // 2]}

    def loglik(prompt, cont):
        it = items[ask(prompt)]
        words = len(cont.split())
        if it.id in first_half:
            return 0.0 if cont.strip() == it.options[it.answer] else -3.0 * words
        return -1.0 * words

    model = scripted(loglik=loglik)
    res = evaluate(mcq_task, model, tmp_path, RunConfig(method="loglik", n_boot=200, progress=False))
    # Cloze prompts: the options are not listed, so their order cannot sway the scores.
    assert all(it.options[k] not in p for p, it in zip(model.prompts, mcq_task.items) for k in it.options)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    second = [r for r in rows if r["id"] not in first_half]
    fewest_words = [min(it.options, key=lambda k: (len(it.options[k].split()), k)) for it in mcq_task.items
                    if it.id not in first_half]
    assert [r["pred"] for r in second] == fewest_words  # the sum favours short options...
    assert all(r["pred_norm"] == "A" for r in second)  # ...the per-token mean ties them all
    expected = (len(first_half) + sum(p == r["gold"] for p, r in zip(fewest_words, second))) / len(rows)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(expected)
    assert res["metrics"]["accuracy_norm"]["value"] == pytest.approx(
        (len(first_half) + sum(r["gold"] == "A" for r in second)) / len(rows))
    assert res["metrics"]["ece"]["value"] is not None and (tmp_path / "reliability.png").is_file()
    first_row = rows[0]
    assert sum(first_row["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_resume_after_a_kill_computes_only_missing_items(tmp_path, mcq_task, scripted, ask):
    reply = _mcq_reply(mcq_task, ask)
    n = len(mcq_task.items)
    cfg = RunConfig(batch_size=5, n_boot=100, progress=False)
    killed = scripted(reply, fail_after=23)
    with pytest.raises(RuntimeError, match="simulated kill"):
        evaluate(mcq_task, killed, tmp_path, cfg)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 20  # four whole batches were saved before the fifth failed
    with (tmp_path / "predictions.jsonl").open("a") as f:
        f.write('{"id": "hw-021", "raw": " The ans')  # a line torn by the kill

    resumed = scripted(reply)
    res = evaluate(mcq_task, resumed, tmp_path, cfg)
    assert len(resumed.prompts) == n - 20 and res["computed_now"] == n - 20
    assert {ask(p) for p in resumed.prompts} == {it.question for it in mcq_task.items[20:]}

    fresh = scripted(reply)
    whole = evaluate(mcq_task, fresh, tmp_path / "fresh", cfg)
    assert res["metrics"] == whole["metrics"]

    again = scripted(reply)
    evaluate(mcq_task, again, tmp_path, cfg)  # a finished run rescored: no model calls at all
    assert again.calls == 0


def test_limit_then_extend(tmp_path, mcq_task, scripted, ask):
    model = scripted(_mcq_reply(mcq_task, ask))
    res = evaluate(mcq_task, model, tmp_path, RunConfig(limit=10, n_boot=50, progress=False))
    assert res["n_items"] == 10 and len(model.prompts) == 10
    more = scripted(_mcq_reply(mcq_task, ask))
    res = evaluate(mcq_task, more, tmp_path, RunConfig(limit=25, n_boot=50, progress=False))
    assert res["n_items"] == 25 and len(more.prompts) == 15


def test_changed_settings_refuse_to_mix(tmp_path, mcq_task, scripted):
    evaluate(mcq_task, scripted(), tmp_path, RunConfig(limit=2, n_boot=10, progress=False))
    with pytest.raises(InputError, match="different method"):
        evaluate(mcq_task, scripted(), tmp_path, RunConfig(method="loglik", limit=2, progress=False))
    with pytest.raises(InputError, match="different model"):
        evaluate(mcq_task, scripted(), tmp_path, RunConfig(model_name="other", limit=2, progress=False))
    evaluate(mcq_task, scripted(), tmp_path, RunConfig(limit=2, seed=5, n_boot=10, progress=False))  # seed is fine
    model = scripted()
    with pytest.raises(InputError, match="subgroup column 'sex' is in no item; available: source, topic"):
        evaluate(mcq_task, model, tmp_path / "new", RunConfig(subgroups=["sex"], progress=False))
    assert model.calls == 0


def test_vqa_token_f1_and_closed_accuracy(tmp_path, images, scripted, ask):
    (tmp_path / "ct.png").write_bytes(images["ct"].read_bytes())
    rows = [
        {"qid": 1, "img_name": "ct.png", "question": "Is there an effusion?", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": 2, "img_name": "ct.png", "question": "Is it normal?", "answer": "No", "answer_type": "CLOSED"},
        {"qid": 3, "img_name": "ct.png", "question": "Which organ?", "answer": "left lung", "answer_type": "OPEN"},
        {"qid": 4, "img_name": "ct.png", "question": "What modality?", "answer": "CT", "answer_type": "OPEN"},
    ]
    (tmp_path / "slake.json").write_text(json.dumps(rows))
    replies = {"Is there an effusion?": "Yes, a small one.", "Is it normal?": "Yes",
               "Which organ?": "the left lung", "What modality?": "MRI"}
    model = scripted(lambda p: replies[ask(p).split("\n")[0]])
    res = evaluate(load_task("vqa", tmp_path / "slake.json"), model, tmp_path / "out",
                   RunConfig(n_boot=100, progress=False))
    m = {k: v["value"] for k, v in res["metrics"].items()}
    assert m["accuracy_closed"] == 0.5 and m["f1_open"] == 0.5
    assert m["f1_closed"] == pytest.approx((0.5 + 0) / 2)  # "yes small one" vs "yes": P 1/3, R 1, F1 1/2
    assert m["f1"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert isinstance(model.prompts[0], list) and model.prompts[0][0]["content"][0]["type"] == "image"


def test_classification_loglik_auc_matches_sklearn(tmp_path, images, scripted):
    for name, path in images.items():
        (tmp_path / f"{name}.png").write_bytes(path.read_bytes())
    labels = ["ct", "fundus", "pathology"]
    file_of = {"ct": "ct.png", "fundus": "retina.png", "pathology": "ihc.png"}
    rng = np.random.default_rng(0)
    gold = rng.choice(labels, 40)
    lines = ["path,label,site"] + [f"{file_of[g]},{g},{'a' if i % 2 else 'b'}" for i, g in enumerate(gold)]
    (tmp_path / "set.csv").write_text("\n".join(lines) + "\n")
    task = load_task("classify", tmp_path / "set.csv")
    noise = iter(rng.normal(size=(40 * 3,)))
    path_label = {v: k for k, v in file_of.items()}

    def loglik(messages, cont):
        truth = path_label[messages[0]["content"][0]["image"].rsplit("/", 1)[1]]
        return (1.0 if cont.strip() == truth else 0.0) + next(noise)

    model = scripted(loglik=loglik)
    with pytest.raises(CapabilityError, match="multimodal"):
        evaluate(task, model, tmp_path / "no", RunConfig(method="loglik", progress=False))
    model.supports_images = True
    res = evaluate(task, model, tmp_path / "out", RunConfig(method="loglik", n_boot=100, progress=False,
                                                            subgroups=["site"]))
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    scores = np.array([[p["scores"][lab] for lab in labels] for p in preds])
    expected = roc_auc_score([labels.index(g) for g in gold], scores, multi_class="ovr")
    assert res["metrics"]["auc"]["value"] == pytest.approx(expected, abs=1e-4)
    assert {"macro_f1", "sensitivity", "specificity", "accuracy", "ece"} <= set(res["metrics"])
    assert set(res["extra"]["per_label"]) == set(labels)
    for png in ("roc.png", "reliability.png", "confusion.png", "subgroup_site.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000


def test_report_generation_rouge_and_bleu(tmp_path, images, scripted):
    (tmp_path / "ct.png").write_bytes(images["ct"].read_bytes())
    refs = ["No acute findings.", "Small left pleural effusion.", "Enlarged cardiac silhouette."]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"id": i, "image": "ct.png", "report": r}) + "\n"
                                              for i, r in enumerate(refs)))
    outputs = iter(["No acute findings.", "Large right pneumothorax.", "Enlarged cardiac silhouette."])
    res = evaluate(load_task("report", tmp_path / "r.jsonl"), scripted(lambda p: next(outputs)), tmp_path / "o",
                   RunConfig(n_boot=50, progress=False, batch_size=1))
    assert res["metrics"]["rougeL"]["value"] == pytest.approx(2 / 3)
    assert 0 < res["metrics"]["bleu"]["value"] < 100


def test_loglik_needs_options(tmp_path, images, scripted):
    (tmp_path / "ct.png").write_bytes(images["ct"].read_bytes())
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "ct.png", "report": "x"}) + "\n")
    with pytest.raises(InputError, match="has none"):
        evaluate(load_task("report", tmp_path / "r.jsonl"), scripted(), tmp_path / "o", RunConfig(method="loglik"))


def test_chat_mode_wraps_prompts_in_a_user_turn(tmp_path, mcq_task, scripted):
    model = scripted(lambda p: "A")
    evaluate(mcq_task, model, tmp_path / "g", RunConfig(chat=True, limit=2, n_boot=10, progress=False))
    assert model.prompts[0][0]["role"] == "user" and model.kwargs[0]["raw"] is False
    model = scripted()
    evaluate(mcq_task, model, tmp_path / "l", RunConfig(chat=True, method="loglik", limit=1, n_boot=10,
                                                         progress=False))
    assert model.prompts[0].startswith("<start_of_turn>user\n") and model.prompts[0].endswith("model\n")
