"""Task readers on files laid out as the datasets publish them, and clear errors on bad files."""

import json

import pytest

from medgem.errors import InputError
from medgem.eval.tasks import load_task


def test_handwritten_set_is_documented_medqa(handwritten):
    task = load_task("medqa", "handwritten")
    assert len(task.items) == len(handwritten) >= 50
    assert all(len(it.options) == 4 for it in task.items)
    assert {it.answer for it in task.items} == {"A", "B", "C", "D"}
    assert all(it.meta["source"].startswith("medgem hand-written") for it in task.items)
    assert all(it.options[it.answer] == raw["answer"] for it, raw in zip(task.items, handwritten))
    assert len({it.question for it in task.items}) == len(task.items)


def test_medqa_keeps_extra_fields_as_metadata(tmp_path, jsonl):
    path = jsonl(tmp_path / "medqa.jsonl", [
        {"question": "Q1?", "answer": "Two", "options": {"A": "One", "B": "Two", "C": "Three", "D": "Four", "E": "Five"},
         "meta_info": "step1", "answer_idx": "B", "metamap_phrases": ["q1"]},
    ])
    item = load_task("medqa", path).items[0]
    assert (item.answer, len(item.options), item.meta) == ("B", 5, {"meta_info": "step1"})


@pytest.mark.parametrize(("cops", "expected"), [([1, 4, 2], "ADB"), ([0, 3, 1], "ADB"), (["a", "d", "b"], "ADB")])
def test_medmcqa_answer_index_bases(tmp_path, jsonl, cops, expected):
    rows = [{"id": f"m{i}", "question": "q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c,
             "subject_name": "Anatomy"} for i, c in enumerate(cops)]
    task = load_task("medmcqa", jsonl(tmp_path / "dev.json", rows))
    assert "".join(it.answer for it in task.items) == expected
    assert task.items[0].meta["subject_name"] == "Anatomy"


def test_medmcqa_mixed_bases_is_an_error(tmp_path, jsonl):
    rows = [{"question": "q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c} for c in (0, 4)]
    with pytest.raises(InputError, match="both 0 and 4"):
        load_task("medmcqa", jsonl(tmp_path / "bad.json", rows))


def test_pubmedqa_released_json_and_jsonl(tmp_path, jsonl):
    released = {"21645374": {"QUESTION": "Do X cause Y?", "CONTEXTS": ["Background.", "Results."],
                             "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": "maybe", "YEAR": "2011"}}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(released, indent=4))
    item = load_task("pubmedqa", tmp_path / "ori_pqal.json").items[0]
    assert (item.id, item.answer, item.options["C"], item.context) == ("21645374", "C", "maybe", "Background.\nResults.")
    assert item.meta == {"year": "2011"}  # the released keys are upper case; they are read case-blind
    hf = jsonl(tmp_path / "pqa.jsonl", [{"pubid": 1, "question": "q", "context": {"contexts": ["c"]},
                                         "final_decision": "no"}])
    assert load_task("pubmedqa", hf).items[0].answer == "B"


def test_mmlu_headerless_release_and_header(tmp_path):
    released = tmp_path / "clinical_knowledge_test.csv"
    released.write_text('"Which, of these?",one,two,three,four,C\nQ2,a,b,c,d,A\n')
    task = load_task("mmlu", released)
    assert [it.answer for it in task.items] == ["C", "A"]
    assert task.items[0].question == "Which, of these?" and task.items[0].meta["subject"] == "clinical_knowledge"
    with_header = tmp_path / "mine.csv"
    with_header.write_text("question,A,B,C,D,answer,site\nQ,a,b,c,d,2,north\n")
    item = load_task("mmlu", with_header).items[0]
    assert (item.answer, item.meta["site"]) == ("C", "north")  # 0-based index as in the HF copy


def test_vqa_slake_and_vqarad_layouts(tmp_path, images):
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").write_bytes(images["ct"].read_bytes())
    slake = [{"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes",
              "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "CLOSED", "qid": 7,
              "triple": ["vhead", "_", "_"]}]
    (tmp_path / "test.json").write_text(json.dumps(slake))
    item = load_task("vqa", tmp_path / "test.json").items[0]
    assert (item.id, item.answer_type, item.answer) == ("7", "closed", "Yes")
    assert item.image.endswith("imgs/xmlab1/source.jpg") and item.meta["modality"] == "CT"

    folder = tmp_path / "VQA_RAD Image Folder"
    folder.mkdir()
    (folder / "synpic1.jpg").write_bytes(images["ct"].read_bytes())
    rad = [{"qid": "0", "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": 2, "answer_type": "OPEN",
            "question_type": "COUNT", "question": "How many?", "phrase_type": "freeform"}]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rad))
    item = load_task("vqa", tmp_path / "VQA_RAD Dataset Public.json").items[0]
    assert (item.answer, item.answer_type, item.meta["image_organ"]) == ("2", "open", "HEAD")


def test_classify_single_and_multi_label(tmp_path, images):
    for name, path in images.items():
        (tmp_path / f"{name}.png").write_bytes(path.read_bytes())
    single = tmp_path / "single.csv"
    single.write_text("path,label,sex\nretina.png,fundus,F\nihc.png,pathology,M\nct.png,ct,F\n")
    task = load_task("classify", single)
    assert (task.labels, task.multi_label, task.items[1].meta) == (["ct", "fundus", "pathology"], False, {"sex": "M"})
    multi = tmp_path / "multi.csv"
    multi.write_text("path,label\nretina.png,normal\nct.png,nodule|effusion\n")
    task = load_task("classify", multi)
    assert task.multi_label and task.items[1].answer == ["nodule", "effusion"]


def test_report_generation_csv(tmp_path, images):
    (tmp_path / "ct.png").write_bytes(images["ct"].read_bytes())
    path = tmp_path / "reports.csv"
    path.write_text('image,findings\nct.png,"No acute findings. Normal liver."\n')
    assert load_task("report", path).items[0].answer == "No acute findings. Normal liver."


def test_ehrqa_from_the_synthetic_generator(tmp_path):
    from medgem.ehr import synth

    synth.write(tmp_path, patients=2, seed=5)
    task = load_task("ehrqa", tmp_path / "qa.jsonl")
    item = task.items[0]
    assert item.record and item.record.endswith(".json") and item.answer_type in {"quantity", "date", "yes_no", "count"}
    assert {"sex", "age_band", "kind"} <= set(item.meta) and "evidence" not in item.meta


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("medqa", '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "B"}\n{broken\n', r"bad\.jsonl:2: not valid JSON"),
        ("medqa", '{"question": "q", "options": {"A": "x", "B": "y"}}\n', r"bad\.jsonl:1: missing field 'answer_idx'"),
        ("medqa", '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}\n', r":1: answer 'E' is not one"),
        ("medqa", '[1, 2]\n', r":1: expected a JSON object"),
        ("mmlu", "question,A,B,C,D,answer\nq,a,b,c\n", r"bad\.jsonl:2: 4 columns"),
        ("pubmedqa", '{"question": "q", "contexts": ["c"], "final_decision": "perhaps"}\n', r":1: final_decision must be"),
        ("vqa", '[{"img_name": "missing.jpg", "question": "q", "answer": "a", "answer_type": "OPEN"}]',
         r"record 0: file 'missing.jpg' not found"),
        ("ehrqa", '{"question": "q", "answer": "a"}\n', r":1: needs the record"),
        ("medqa", "", r"no items"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, task, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_task(task, path)


def test_duplicate_ids_and_unknown_task(tmp_path, jsonl):
    rows = [{"id": 1, "question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}] * 2
    with pytest.raises(InputError, match="duplicate item id '1'"):
        load_task("medqa", jsonl(tmp_path / "dup.jsonl", rows))
    with pytest.raises(InputError, match="unknown task 'medqb'"):
        load_task("medqb", tmp_path / "dup.jsonl")
    with pytest.raises(InputError, match="data file not found"):
        load_task("medqa", tmp_path / "nope.jsonl")


def test_binary_file_is_an_input_error(tmp_path):
    path = tmp_path / "image.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(InputError, match=r"image\.jsonl: not UTF-8 text"):
        load_task("medqa", path)
