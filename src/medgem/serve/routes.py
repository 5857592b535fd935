"""The endpoints: OpenAI's chat completions (with tools, structured outputs and logprobs), completions
(with echo), embeddings and models; vLLM's tokenize and detokenize; the image preview the web page
uses; health, readiness and metrics.

A generation request goes: key check (app.auth, before the body is read) -> body schema (FastAPI) -> model name and limits -> images
decoded and prompt tokenised (in a worker thread, off the event loop) -> prompt-length check ->
engine submit (429 when the queue is full) -> JSON when every choice is done, or server-sent events
at once, ending with `data: [DONE]`. A client that goes away cancels its generation: streaming
through Starlette's disconnect handling, non-streaming through a watcher on the connection.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from medgem.engine.generate import Completion
from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Event
from medgem.errors import CapabilityError, InputError, MedgemError
from medgem.processing import tools as toolfmt
from medgem.processing.boxes import answer_boxes
from medgem.processing.thinking import ThoughtSplitter, split_thought
from medgem.serve.errors import APIError, error_body, medgem_error
from medgem.serve.inputs import chat_messages, decode_image, image_parts, parse_data_url, recipe_prompt
from medgem.serve.reasoning import with_instruction
from medgem.serve.runtime import Runtime
from medgem.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ImagePart,
    SamplingFields,
    TokenizeRequest,
)
from medgem.serve.structured import (
    chat_logprobs,
    compile_constraint,
    completion_logprobs,
    logit_bias,
    requested_constraint,
    tool_constraint,
    tool_setup,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
router = APIRouter()

Prompts = list[tuple[list[int], Any]]
KEEPALIVE_SECONDS = 10.0  # an SSE comment this often while a stream waits, so proxies and clients keep it open


async def run_in_own_thread(fn: Callable[[], T]) -> T:
    """Run blocking model work (the embedding encoder) in a thread that ends with it.

    A persistent pool thread that once ran a multi-threaded torch op keeps its OpenMP team, and with
    more team threads than cores libgomp spins only briefly between parallel regions: the generation
    engine then decoded 12 % slower for the rest of the server's life (59-60 against 62-69 tok/s on 2
    cores, BENCHMARKS.md). A thread that ends takes its team with it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[Any], None], value: Any) -> None:
        if not done.done():  # the request may have been cancelled meanwhile
            outcome(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            loop.call_soon_threadsafe(settle, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, result)

    threading.Thread(target=target, name="medgem-encode", daemon=True).start()
    return await done


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


# -- request checks ---------------------------------------------------------------------------------
def _refuse_unsupported(body: SamplingFields | EmbeddingRequest) -> None:
    feature = body.unsupported()
    if feature:
        raise APIError(400, f"{feature} is not supported by this server", param=feature, code="unsupported_parameter")


def _sampling(body: SamplingFields, rt: Runtime, max_tokens: int | None) -> SamplingParams:
    """Refused features, limits on n and max_tokens, then the engine's sampling parameters."""
    limits = rt.settings.limits
    _refuse_unsupported(body)
    if body.n > limits.max_n:
        raise APIError(400, f"n is {body.n}; this server returns at most {limits.max_n} choices",
                       param="n", code="n_too_large")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {limits.max_tokens}",
                       param="max_tokens", code="max_tokens_too_large")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return SamplingParams(
        max_new_tokens=max_tokens or limits.default_max_tokens,
        temperature=rt.settings.default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(stop),
        ignore_eos=body.ignore_eos,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=logit_bias(body, rt.pipe.config.vocab_size),
    )


async def _constrained(params: SamplingParams, pipe, constraint, field: str | None) -> SamplingParams:
    """params with the compiled output constraint (compiled off the event loop; cached by the pipeline)."""
    if constraint is None:
        return params
    grammar = await run_in_threadpool(compile_constraint, pipe, constraint, field)
    return replace(params, constraint=grammar)


def _check_prompt(rt: Runtime, n_tokens: int, where: str) -> None:
    context = rt.pipe.config.max_position_embeddings
    limit = min(rt.settings.limits.max_prompt_tokens, context - 1)
    if n_tokens > limit:
        raise APIError(400, f"{where} has {n_tokens} tokens; this server accepts at most {limit} prompt tokens "
                            f"(the model's context is {context})", param=where, code="context_length_exceeded")


def _reasoning(body: ChatRequest, rt: Runtime) -> bool:
    """The thinking switch: `reasoning`, or OpenAI's `reasoning_effort` (none/minimal = off)."""
    by_effort = None if body.reasoning_effort is None else body.reasoning_effort not in ("none", "minimal")
    if body.reasoning is not None and by_effort is not None and body.reasoning != by_effort:
        raise APIError(400, "reasoning and reasoning_effort disagree; send one of them", param="reasoning")
    wanted = body.reasoning if body.reasoning is not None else bool(by_effort)
    if wanted and not rt.thinking:
        raise APIError(400, f"model {rt.model_id!r} has no thinking mode (MedGemma 27B has one); drop "
                            "reasoning or set it to false", param="reasoning", code="reasoning_not_supported")
    return wanted


# -- running a generation ---------------------------------------------------------------------------
class Run:
    """One request's generation: the merged events of all its choices, plus accounting."""

    def __init__(self, rt: Runtime, route: str, prompts: Prompts, params: SamplingParams, n: int,
                 prompt_logprobs: int | None = None):
        self.rt, self.route = rt, route
        self.count = len(prompts) * n
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.started = time.perf_counter()
        self.first_text: float | None = None
        self.generated = 0  # completion tokens so far, for the access log
        self.events = rt.backend.submit(prompts, params, n, prompt_logprobs)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        try:
            async for item in self.events:
                yield self._seen(item)
        except asyncio.CancelledError:
            self.rt.metrics.cancelled.inc()
            log.info("%s: client went away; generation cancelled", self.route)
            raise
        finally:
            await self.events.aclose()

    def _seen(self, item: tuple[int, Event]) -> tuple[int, Event]:
        _, event = item
        if event.text and self.first_text is None:
            self.first_text = time.perf_counter()
            self.rt.metrics.ttft.labels(self.route).observe(self.first_text - self.started)
        if event.done and event.completion is not None:
            self.rt.metrics.completion_tokens.inc(event.completion.completion_tokens)
            self.generated += event.completion.completion_tokens
        return item

    def usage(self, completions: list[Completion]) -> dict[str, int]:
        generated = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    async def gather(self) -> list[Completion]:
        finals: list[Completion | None] = [None] * self.count
        async for index, event in self:
            if event.done:
                finals[index] = event.completion
        return finals  # type: ignore[return-value]


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_gone(request: Request, step):
    """Await `step` unless the client disconnects first; then cancel it (and the generation) and raise."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(step), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientGone
    return work.result()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """SSE lines, with a comment line as keep-alive while a request waits for a batch slot; an error
    after the headers went out becomes an error event, and `data: [DONE]` always ends the stream."""
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield ": waiting\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                break
            pending = None
            yield _sse(chunk)
    except (APIError, MedgemError) as exc:
        err = exc if isinstance(exc, APIError) else medgem_error(exc)
        yield _sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    yield _sse("[DONE]")


async def _respond(run: Run, request: Request, stream: AsyncIterator[dict[str, Any]] | None, answer) -> Response:
    """Stream at once (the queue wait shows as keep-alives), or answer when every choice is done."""
    if stream is not None:
        return StreamingResponse(_event_stream(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(answer(await _unless_gone(request, run.gather())))
    except ClientGone:
        log.info("%s: client went away; generation cancelled", run.route)
        return Response(status_code=499)
    except MedgemError as exc:
        raise medgem_error(exc) from None


# -- chat ------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    rt = runtime(request)
    pipe = rt.pipeline(body.model)
    params = _sampling(body, rt, body.max_completion_tokens or body.max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if body.logprobs:
        params = replace(params, logprobs=body.top_logprobs or 0)
    thinking = _reasoning(body, rt)
    specs, tool_choice = tool_setup(body)
    constraint, field = requested_constraint(body)
    calls_constraint = tool_constraint(specs, tool_choice, body.parallel_tool_calls)
    if calls_constraint is not None and constraint is not None:
        raise APIError(400, f"tools and {field} both constrain the answer; send one (or tool_choice: none)",
                       param=field, code="invalid_value")
    if calls_constraint is not None:
        constraint, field = calls_constraint, "tools"
    if not pipe.supports_images and image_parts(body.messages):  # refused before anything is decoded
        raise medgem_error(CapabilityError(f"model {rt.model_id!r} has no vision tower, so it cannot read "
                                           "images; send text only"))
    prompt = None  # a recipe's prompt (MedGemma 1.5's input layouts), with the padding localize maps back
    if body.recipe is not None:
        prompt, system = await run_in_threadpool(recipe_prompt, body, pipe, rt.settings.limits, params.max_new_tokens)
        messages = prompt.messages
    else:
        messages, system = await run_in_threadpool(chat_messages, body.messages, rt.settings.limits)
        try:
            messages = toolfmt.history(messages)
        except InputError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_message") from None
    if specs:
        system = "\n\n".join(filter(None, [system, toolfmt.system_text(specs)]))
    if thinking:
        system = with_instruction(system)
    params = await _constrained(params, pipe, constraint, field)
    ids, pixels = await run_in_threadpool(pipe.prompt_inputs, messages, False, system)
    _check_prompt(rt, len(ids), "messages")
    run = request.state.run = Run(rt, "chat", [(ids, pixels)], params, body.n)
    rt.metrics.prompt_tokens.inc(run.prompt_tokens)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.model_id}
    # A thought never reaches `content`. It is returned as `reasoning_content` when asked for, and when a
    # model without a thinking mode wrote one unasked (MedGemma 1.5 4B does); a thinking-mode model's
    # thought is dropped when reasoning is off.
    keep = thinking or not rt.thinking
    use_tools = bool(specs) and tool_choice != "none"

    def boxes(text: str) -> dict[str, Any]:
        """localize: the answer's boxes in the pixels of the image sent."""
        if prompt is None or prompt.padding is None:
            return {}
        return {"boxes": [b.to_dict() for b in answer_boxes(text, prompt.padding)]}

    def message(completion: Completion) -> tuple[dict[str, Any], str]:
        thought, text = ThoughtSplitter().feed(completion.text, final=True)
        extra = {"reasoning_content": thought} if (keep and thought) or thinking else {}
        calls = toolfmt.parse_calls(text, specs) if use_tools else None
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls, **extra}, "tool_calls"
        return {"role": "assistant", "content": text, **extra, **boxes(text)}, completion.finish_reason

    def logprobs(completion: Completion) -> dict[str, Any] | None:
        return chat_logprobs(pipe, completion.logprobs or []) if body.logprobs else None

    def answer(completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(completions):
            msg, reason = message(c)
            choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": logprobs(c)})
        return {**head, "object": "chat.completion", "choices": choices, "usage": run.usage(completions)}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {**head, "object": "chat.completion.chunk", "choices": choices, **extra}

        for i in range(run.count):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        splitters = [ThoughtSplitter() for _ in range(run.count)]
        calls = [toolfmt.CallStream(tools_only=tool_choice not in ("auto", "none")) for _ in range(run.count)]
        finals: list[Completion] = []
        async for index, event in run:
            thought, text = splitters[index].feed(event.text, final=event.done)
            if event.done and prompt is not None and prompt.padding is not None:
                yield chunk([{"index": index, "delta": boxes(split_thought(event.completion.text)[1]),
                              "finish_reason": None}])
            deltas = calls[index].feed(text) if use_tools else ([{"content": text}] if text else [])
            if keep and thought:
                deltas.insert(0, {"reasoning_content": thought})
            lp = chat_logprobs(pipe, event.logprobs) if body.logprobs and event.logprobs else None
            if lp and not deltas:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):
                yield chunk([{"index": index, "delta": delta, "finish_reason": None,
                              **({"logprobs": lp} if lp and k == 0 else {})}])
            if event.done:
                finals.append(event.completion)
                reason = "tool_calls" if use_tools and calls[index].calls else event.completion.finish_reason
                yield chunk([{"index": index, "delta": {}, "finish_reason": reason}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=run.usage(finals))

    return await _respond(run, request, chunks() if body.stream else None, answer)


# -- completions -----------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    rt = runtime(request)
    pipe = rt.pipeline(body.model)
    params = _sampling(body, rt, body.max_tokens)
    if body.logprobs is not None:
        params = replace(params, logprobs=body.logprobs)
    if body.echo and body.stream:
        raise APIError(400, "echo is not available with stream: true", param="echo", code="invalid_value")
    constraint, field = requested_constraint(body)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(texts) * body.n > rt.settings.max_queue + rt.settings.max_batch:
        raise APIError(400, f"{len(texts)} prompts x n={body.n} is more than this server can hold at once",
                       param="prompt", code="too_many_prompts")
    params = await _constrained(params, pipe, constraint, field)
    prompts: Prompts = []
    for i, text in enumerate(texts):
        ids = await run_in_threadpool(pipe.prompt_ids, text, True)
        _check_prompt(rt, len(ids), "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]")
        prompts.append((ids, None))
    scored = body.logprobs if body.echo and body.logprobs is not None else None
    run = request.state.run = Run(rt, "completions", prompts, params, body.n, prompt_logprobs=scored)
    rt.metrics.prompt_tokens.inc(run.prompt_tokens)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": rt.model_id}

    def choice(i: int, c: Completion) -> dict[str, Any]:  # a thought trace is dropped, as in chat
        prompt = texts[i // body.n] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            entries = (c.prompt_logprobs or []) + (c.logprobs or []) if body.echo else c.logprobs or []
            lead = prompts[i // body.n][0][0] if body.echo else None
            logprobs = completion_logprobs(pipe, entries, lead=lead)
        return {"index": i, "text": prompt + split_thought(c.text)[1], "finish_reason": c.finish_reason,
                "logprobs": logprobs}

    def answer(completions: list[Completion]) -> dict[str, Any]:
        return {**head, "choices": [choice(i, c) for i, c in enumerate(completions)], "usage": run.usage(completions)}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        finals: list[Completion] = []
        splitters = [ThoughtSplitter() for _ in range(run.count)]
        offsets = [0] * run.count
        async for index, event in run:
            text = splitters[index].feed(event.text, final=event.done)[1]
            if text:
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(pipe, event.logprobs or [], offsets[index])
                    offsets[index] += len(event.text)
                yield {**head, "choices": [{"index": index, "text": text, "finish_reason": None,
                                            "logprobs": logprobs}]}
            if event.done:
                finals.append(event.completion)
                yield {**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                            "finish_reason": event.completion.finish_reason}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": run.usage(finals)}

    return await _respond(run, request, chunks() if body.stream else None, answer)


# -- tokenize and detokenize (vLLM's endpoints) -----------------------------------------------------
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of a prompt (raw text, with <bos> unless add_special_tokens is false) or of chat messages
    rendered with the chat template, as the model would see them."""
    rt = runtime(request)
    pipe = rt.pipeline(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send either prompt or messages", param="prompt", code="invalid_value")
    if body.prompt is not None:
        ids = pipe.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
    else:
        if image_parts(body.messages):
            raise APIError(400, "tokenize takes text messages only", param="messages", code="invalid_message")
        messages, system = await run_in_threadpool(chat_messages, body.messages, rt.settings.limits)
        try:
            ids = await run_in_threadpool(pipe.prompt_ids, toolfmt.history(messages), False, system)
        except InputError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_message") from None
    limit = rt.settings.limits.max_prompt_tokens
    return {"tokens": ids, "count": len(ids), "max_model_len": min(limit, pipe.config.max_position_embeddings)}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    rt = runtime(request)
    pipe = rt.pipeline(body.model)
    vocab = pipe.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens",
                       code="invalid_value")
    return {"prompt": pipe.tokenizer.decode(body.tokens)}


# -- embeddings and models -------------------------------------------------------------------------
@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """MedSigLIP embeddings of texts and images (one shared space), unit length, in input order."""
    rt = runtime(request)
    encoder = rt.encoder(body.model)
    _refuse_unsupported(body)
    items = [body.input] if isinstance(body.input, str) else body.input
    images = [i for i, item in enumerate(items) if isinstance(item, ImagePart)]
    if len(images) > rt.settings.limits.max_images:
        raise APIError(400, f"the request has {len(images)} images; this server accepts at most "
                            f"{rt.settings.limits.max_images} per request", param="input", code="too_many_images")

    def embed() -> tuple[np.ndarray, int]:
        vectors = np.zeros((len(items), encoder.dim), np.float32)
        texts = sorted(set(range(len(items))) - set(images))
        if texts:
            vectors[texts] = encoder.embed_texts([items[i] for i in texts])
        if images:
            pictures = []
            for i in images:
                where = f"input[{i}]"
                media, data = parse_data_url(items[i].image_url.url, where)
                pictures.append(decode_image(data, media, items[i].image_url.window, rt.settings.limits, where).image)
            vectors[images] = encoder.embed_images(pictures)
        return vectors, sum(len(encoder.tokenizer.encode(items[i])) for i in texts)

    vectors, tokens = await run_in_own_thread(embed)
    as_base64 = body.encoding_format == "base64"  # little-endian float32, as OpenAI sends it
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": rt.embedding_id,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _models(rt: Runtime) -> list[dict[str, Any]]:
    """OpenAI's model cards; the generation model's also says whether it is a base model (null while it
    loads), so the web page opens in completion mode for one."""
    cards = [{"id": name, "object": "model", "created": rt.created, "owned_by": "medgem"}
             for name in (rt.model_id, rt.embedding_id) if name]
    cards[0]["base_model"] = None if rt.pipe is None else rt.pipe.base_model
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _models(runtime(request))}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    found = [card for card in _models(runtime(request)) if card["id"] == model]
    if not found:
        raise APIError(404, "model not found", param="model", code="model_not_found")
    return found[0]


# -- the web page's image preview ------------------------------------------------------------------
@router.post("/v1/dicom/preview")
async def preview(request: Request, window: str | None = None, size: int = 512) -> dict[str, Any]:
    """Raw image bytes (DICOM, PNG or JPEG) -> the rendered image as a PNG data URI, plus for DICOM the
    de-identified technical summary. Nothing identifying leaves the server: pixels and whitelisted fields."""
    rt = runtime(request)
    if not 16 <= size <= 2048:
        raise APIError(422, "size must be between 16 and 2048 pixels", param="size", code="invalid_value")
    data = await request.body()
    if not data:
        raise APIError(400, "the request body is empty; send the image bytes", code="invalid_image")
    media = "application/dicom" if request.headers.get("content-type", "").startswith("application/dicom") else None
    decoded = await run_in_threadpool(decode_image, data, media, window, rt.settings.limits, "image", size)
    png = io.BytesIO()
    await run_in_threadpool(decoded.image.save, png, "PNG")
    return {"media_type": decoded.media_type, "width": decoded.image.width, "height": decoded.image.height,
            "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
            "summary": decoded.summary}


# -- operations ------------------------------------------------------------------------------------
@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    rt = runtime(request)
    if rt.ready:
        return JSONResponse({"status": "ready", "model": rt.model_id})
    state = "draining" if rt.draining else ("failed" if rt.load_error else "loading")
    return JSONResponse({"status": state, "model": rt.model_id}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(runtime(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
