"""A thought trace never reaches the answer text of the Python API (processing/thinking.py through
Pipeline.generate/complete/stream), and stays available as `Completion.reasoning`."""

from __future__ import annotations

THOUGHT = "The clavicles are symmetric; no fracture line."
ANSWER = "No acute osseous abnormality."
RAW = f"<unused94>thought\n{THOUGHT}<unused95>{ANSWER}"
QUESTION = [{"role": "user", "content": "Any clavicle fracture?"}]


def test_pipeline_answers_never_hold_the_thought(scripted_pipe):
    pipe = scripted_pipe(QUESTION, RAW)
    assert pipe.generate(QUESTION, max_new_tokens=64) == ANSWER
    completion = pipe.complete([QUESTION], max_new_tokens=64)[0]
    assert (completion.text, completion.reasoning, completion.finish_reason) == (ANSWER, THOUGHT, "stop")
    assert "".join(pipe.stream(QUESTION, max_new_tokens=64)) == ANSWER
    assert pipe.last_completion.reasoning == THOUGHT
    pipe.use_prompt_lookup()  # the speculative scheduler's path splits too
    assert pipe.complete([QUESTION], max_new_tokens=64)[0].text == ANSWER
    plain = scripted_pipe(QUESTION, ANSWER)
    assert plain.complete([QUESTION], max_new_tokens=64)[0].reasoning == ""
    unfinished = scripted_pipe(QUESTION, RAW).complete([QUESTION], max_new_tokens=6)[0]  # cut inside the thought
    assert unfinished.text == "" and unfinished.finish_reason == "length"
