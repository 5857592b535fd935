"""`medgem serve --ray`: a local Ray cluster, 2 Ray Serve replicas of the same app, and the same
`openai` client checks (answers equal to the pipeline's greedy answers, streaming, n, stop, usage)."""

from __future__ import annotations

import openai
import pytest

from medgem.serve.settings import Limits, ServeSettings

pytest.importorskip("ray.serve", reason='needs Ray Serve (pip install "ray[serve]")')

MODEL = "gemma-3-270m"
QUESTION = [{"role": "user", "content": "Name one symptom of influenza."}]


@pytest.fixture(scope="module")
def ray_url(free_port):
    import ray
    from ray import serve

    from medgem.serve.ray_app import application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(dtype="float32", limits=Limits(max_prompt_tokens=256, max_tokens=32))
        serve.run(application(settings, replicas=2, cpus_per_replica=1), name="medgem", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_openai_client_against_two_replicas(ray_url, real_pipe):
    from ray import serve

    deployment = serve.status().applications["medgem"].deployments["medgem"]
    assert deployment.replica_states.get("RUNNING") == 2

    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    expected = real_pipe.complete([QUESTION], max_new_tokens=6)[0]
    for _ in range(4):  # several calls, so both replicas answer
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == expected.text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, 6)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                                 stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == expected.text
    full = real_pipe.complete(["The heart has four"], raw=True, max_new_tokens=8)[0].text
    stop = full.split()[1]
    cut = client.completions.create(model=MODEL, prompt="The heart has four", max_tokens=8, temperature=0, stop=stop, n=2)
    assert [c.text for c in cut.choices] == [full[: full.index(stop)]] * 2
    assert all(c.finish_reason == "stop" for c in cut.choices)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1000)
