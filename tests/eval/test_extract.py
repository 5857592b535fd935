"""Answer extraction on a table of tricky model replies, and the free-text answer helpers."""

import pytest

from medgem.eval.extract import closed_match, extract_choice, normalize_answer, token_f1

DRUGS = {"A": "Metformin", "B": "Insulin glargine", "C": "Glipizide", "D": "Sitagliptin"}
FIVE = {"A": "Aortic stenosis", "B": "Mitral regurgitation", "C": "Pulmonary embolism", "D": "Embolism",
        "E": "Pericarditis"}
HEP = {"A": "Hepatitis A", "B": "Hepatitis B", "C": "Hepatitis C", "D": "Hepatitis E"}
VIT = {"A": "Vitamin C deficiency", "B": "Vitamin D deficiency", "C": "Iron deficiency", "D": "Lead poisoning"}
YNM = {"A": "yes", "B": "no", "C": "maybe"}

TABLE = [
    ("The answer is (B).", DRUGS, "B"),
    ("B) Insulin glargine", DRUGS, "B"),
    ("**C**", DRUGS, "C"),
    ("Answer: d", DRUGS, "D"),
    ("I think it's option A, not B", DRUGS, "A"),
    ("Sitagliptin", DRUGS, "D"),
    ("The correct answer is C. Glipizide", DRUGS, "C"),
    ("(A)", DRUGS, "A"),
    ("A.", DRUGS, "A"),
    ("a", DRUGS, "A"),
    ("Answer: (e)", FIVE, "E"),
    ("The answer is a rare condition called pericarditis.", FIVE, "E"),
    ("A 45-year-old man presents with chest pain. The answer is B", FIVE, "B"),
    ("It is not A. The answer is D.", DRUGS, "D"),
    ("Final answer: **B**", DRUGS, "B"),
    ("The answer is A. Wait, actually the answer is C.", DRUGS, "C"),
    ("I would choose C because it stimulates insulin release.", DRUGS, "C"),
    ("C is correct.", DRUGS, "C"),
    ("Option D is the best answer.", DRUGS, "D"),
    ("The most likely diagnosis is pulmonary embolism.", FIVE, "C"),
    ("Answer:\nB", DRUGS, "B"),
    ("B. Insulin glargine\nExplanation: A is wrong in type 1 diabetes.", DRUGS, "B"),
    ("[C]", DRUGS, "C"),
    ("answer - B", DRUGS, "B"),
    ("The correct option is (d) sitagliptin", DRUGS, "D"),
    ("Yes", YNM, "A"),
    ("no, the evidence does not support it", YNM, "B"),
    ("Maybe.", YNM, "C"),
    ("The answer is yes.", YNM, "A"),
    ("", DRUGS, None),
    ("I don't know.", DRUGS, None),
    ("The answer is E", DRUGS, None),
    ("\n\n   B  \n", DRUGS, "B"),
    ("Answer: B, not C", DRUGS, "B"),
    ("Not B. Rather, it's C.", DRUGS, "C"),
    ("Both A and C seem plausible, but the answer is A", DRUGS, "A"),
    ("The answer is option B: Insulin glargine", DRUGS, "B"),
    ("ANSWER: c.", DRUGS, "C"),
    ("The correct answer is metformin.", DRUGS, "A"),
    ("`B`", DRUGS, "B"),
    ("__D__", DRUGS, "D"),
    ("(B) Insulin glargine is the drug of choice here.", DRUGS, "B"),
    ("b) insulin glargine", DRUGS, "B"),
    ("Choice C", DRUGS, "C"),
    ("Between (A) and (C), (C) is better.", DRUGS, "C"),
    ("Correct answer: C) Glipizide", DRUGS, "C"),
    ("I'd go with D.", DRUGS, "D"),
    ("The answer is: Metformin", DRUGS, "A"),
    ("Hepatitis B", HEP, "B"),
    ("Vitamin D deficiency causes rickets.", VIT, "B"),
    ("A and B are incorrect; D is the right answer.", DRUGS, "D"),
    ("The answer is not A", DRUGS, None),
    ("Answer: B\n\nQuestion: A 30-year-old woman has a rash. Answer: C", DRUGS, "B"),
    ("It is not metformin; glipizide is preferred.", DRUGS, "C"),
    ("Probably D.", DRUGS, "D"),
    ("The answer is a", DRUGS, "A"),
    ("answer is (a) metformin", DRUGS, "A"),
    ("A", DRUGS, "A"),
    ("Metformin, not glipizide", DRUGS, "A"),
    (" A. Metformin\nAnswer: B. Insulin glargine\nAnswer:", DRUGS, "A"),  # a base model running on
    ("Metformin lowers hepatic glucose output.\nAnswer: A", DRUGS, "A"),
]


@pytest.mark.parametrize(("reply", "options", "expected"), TABLE)
def test_extract_choice(reply, options, expected):
    assert extract_choice(reply, options) == expected


def test_table_is_large():
    assert len(TABLE) >= 40


def test_normalize_answer_is_squad_style():
    assert normalize_answer("The  Left Lung!") == "left lung"
    assert normalize_answer("an X-ray") == "x ray"


@pytest.mark.parametrize(
    ("pred", "ref", "f1"),
    [
        ("left lung", "left lung", 1.0),
        ("the left lung", "Left lung.", 1.0),
        ("left", "left lung", 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
        ("right upper lobe", "upper lobe of left lung", 2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5)),
        ("heart", "lung", 0.0),
        ("", "", 1.0),
        ("", "lung", 0.0),
        ("lung lung", "lung", 2 * 0.5 * 1.0 / 1.5),  # repeated tokens count once per match
    ],
)
def test_token_f1(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("pred", "ref", "ok"),
    [
        ("Yes, there is an effusion.", "yes", True),
        ("No.", "yes", False),
        ("There is no effusion", "no", True),
        ("not sure", "no", False),
        ("CT scan of the chest", "CT", True),
        ("MRI", "CT", False),
        ("Left side", "left", True),
    ],
)
def test_closed_match(pred, ref, ok):
    assert closed_match(pred, ref) is ok
