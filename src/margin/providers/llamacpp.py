"""`llamacpp`: a local GGUF model run in-process by llama-cpp-python, behind the Provider protocol.

llama.cpp contexts are not thread safe, so every call runs in a worker thread while holding both an
asyncio.Lock (ordering, no thread parked per waiting request) and a threading.Lock (the guarantee,
even if an awaiting task was cancelled before its thread finished). Nothing is fetched from the
network: the GGUF comes from `model_path` or from a locally installed package's `assemble()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson

from margin.config import ProviderConfig
from margin.domain import Endpoint
from margin.providers.base import Chunk, Reply, UpstreamError, UpstreamTimeout

T = TypeVar("T")

_DONE = Chunk(raw=b"data: [DONE]\n\n", data=None)
_CTX_RE = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
# OpenAI request field -> llama-cpp-python keyword, copied when present and not null.
_PASSTHROUGH = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


class LocalModelError(RuntimeError):
    """The local model cannot be loaded: missing optional extra, GGUF package or file."""


def model_dir() -> Path:
    """Where GGUF files assembled from packages are cached: $MARGIN_MODEL_DIR or ~/.cache/margin/models."""
    env = os.environ.get("MARGIN_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "margin" / "models"


def resolve_gguf(cfg: ProviderConfig) -> Path:
    """`cfg.model_path` if set; else the cached file assembled once from `cfg.gguf_package`."""
    if cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if not path.is_file():
            raise LocalModelError(f"provider {cfg.name}: model_path {path} is not a file")
        return path
    pkg = cfg.gguf_package or ""
    try:
        mod = importlib.import_module(pkg.replace("-", "_"))
    except ImportError as e:
        raise LocalModelError(
            f"provider {cfg.name}: gguf_package {pkg!r} is not installed ({e}); "
            "pip install 'margin[local]' or set model_path"
        ) from None
    assemble = getattr(mod, "assemble", None)
    if not callable(assemble):
        raise LocalModelError(f"provider {cfg.name}: package {pkg!r} has no assemble() function")
    target = model_dir() / str(getattr(mod, "MODEL_NAME", f"{mod.__name__}.gguf"))
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes in place; go through a temporary name so a crash never leaves a torn file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise LocalModelError(f"provider {cfg.name}: assembling the GGUF from {pkg!r} failed: {e}") from e
    return target


def _fold_system(messages: list[Any]) -> list[Any]:
    """Prepend system/developer text to the first user turn (as Gemma's own template does)."""
    system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m not in system]
    text = "\n\n".join(str(m.get("content") or "") for m in system)
    if not system or not rest or not isinstance(rest[0].get("content"), str):
        return messages
    return [{**rest[0], "content": f"{text}\n\n{rest[0]['content']}"}, *rest[1:]]


class _Job:
    """One request's cancellation flag and token counts (filled by the counting generate())."""

    __slots__ = ("cancel", "last_eog", "prompt_tokens", "sampled")

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.prompt_tokens = 0
        self.sampled = 0
        self.last_eog = False

    @property
    def completion_tokens(self) -> int:
        # Same rule as llama-cpp-python's own usage: an end-of-generation token is not counted.
        return self.sampled - (1 if self.last_eog else 0)


class LlamaCppProvider:
    kind = "llamacpp"

    def __init__(self, cfg: ProviderConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.model_path: Path | None = None
        self._llama: Any = None
        self._lock = asyncio.Lock()
        self._tlock = threading.Lock()
        self._job: _Job | None = None
        self._fold_system = False  # Gemma's turn format has no system role

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llama is not None:
            return
        try:
            import llama_cpp
        except ImportError:
            raise LocalModelError(
                f"provider {self.name}: kind llamacpp needs the optional extra: pip install 'margin[local]'"
            ) from None
        self._llama = await asyncio.to_thread(self._load, llama_cpp)

    def _load(self, llama_cpp: Any) -> Any:
        self.model_path = resolve_gguf(self.cfg)
        kw: dict[str, Any] = {"n_ctx": self.cfg.n_ctx, "verbose": False}
        if self.cfg.n_threads:
            kw["n_threads"] = kw["n_threads_batch"] = self.cfg.n_threads
        try:
            llama = llama_cpp.Llama(model_path=str(self.model_path), **kw)
        except Exception as e:
            raise LocalModelError(f"provider {self.name}: cannot load {self.model_path}: {e}") from e
        # GGUFs without an embedded chat template (like the Gemma 3 270M package) would fall back
        # to llama-cpp-python's "llama-2" format; use the family's own turn format instead.
        meta = getattr(llama, "metadata", {}) or {}
        if not meta.get("tokenizer.chat_template") and meta.get("general.architecture", "").startswith("gemma"):
            llama.chat_format = "gemma"
            self._fold_system = True
        self._install_counter(llama, llama_cpp)
        return llama

    def _install_counter(self, llama: Any, llama_cpp: Any) -> None:
        """Wrap llama.generate (used by both completion paths) to count prompt and sampled tokens
        for the current job, and to stop generation at the next token once the job is cancelled."""
        original = llama.generate
        try:
            vocab = llama._model.vocab

            def is_eog(tok: int) -> bool:
                return bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        except AttributeError:  # pragma: no cover - older/newer bindings

            def is_eog(tok: int) -> bool:
                return bool(tok == llama.token_eos())

        def generate(tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
            job = self._job
            if job is not None:
                job.prompt_tokens = len(tokens)
            gen = original(tokens, *args, **kwargs)
            try:
                for tok in gen:
                    if job is not None:
                        if job.cancel.is_set():
                            return
                        job.sampled += 1
                        job.last_eog = is_eog(tok)
                    yield tok
            finally:
                gen.close()

        llama.generate = generate

    async def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            async with self._lock:
                await asyncio.to_thread(self._guarded, lambda _job: llama.close(), _Job())

    # ---- requests --------------------------------------------------------------------------

    def _require(self) -> Any:
        if self._llama is None:
            raise UpstreamError(503, f"provider {self.name}: local model not loaded (start() not called)")
        return self._llama

    def _bad(self, msg: str) -> UpstreamError:
        return UpstreamError(400, f"provider {self.name}: {msg}", "invalid_request_error")

    def _kwargs(self, endpoint: Endpoint, payload: dict[str, Any], stream: bool) -> dict[str, Any]:
        if endpoint not in ("chat", "completion"):
            raise self._bad(f"llamacpp does not support {endpoint}{'s' if endpoint == 'embedding' else ''}")
        if payload.get("n", 1) not in (1, None):
            raise self._bad("llamacpp supports only n=1")
        kw: dict[str, Any] = {"stream": stream, "model": payload.get("model")}
        if endpoint == "chat":
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise self._bad("'messages' must be a non-empty list")
            kw["messages"] = _fold_system(messages) if self._fold_system else messages
        else:
            prompt = payload.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            tokens = isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
            if not (isinstance(prompt, str) or tokens):
                raise self._bad("'prompt' must be a string or one list of token ids")
            kw["prompt"] = prompt
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise self._bad("'max_tokens' must be a positive integer")
            kw["max_tokens"] = max_tokens
        for key in _PASSTHROUGH:
            if payload.get(key) is not None:
                kw[key] = payload[key]
        return kw

    def _guarded(self, fn: Callable[[_Job], T], job: _Job) -> T:
        with self._tlock:
            self._job = job
            try:
                return fn(job)
            finally:
                self._job = None

    def _error(self, e: BaseException) -> Exception:
        if isinstance(e, UpstreamError | UpstreamTimeout):
            return e
        msg = str(e)
        if m := _CTX_RE.search(msg):
            text = f"This model's maximum context length is {m.group(2)} tokens, but the prompt has {m.group(1)} tokens"
            err = {"message": text, "type": "invalid_request_error", "code": "context_length_exceeded"}
            body = orjson.dumps({"error": err})
            return UpstreamError(400, text, "context_length_exceeded", body)
        if isinstance(e, ValueError | TypeError | KeyError):
            return self._bad(f"invalid request: {msg}")
        return UpstreamError(500, f"provider {self.name}: llama.cpp failed: {type(e).__name__}: {msg}")

    async def send(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> Reply:
        llama = self._require()
        kw = self._kwargs(endpoint, payload, stream=False)
        call = llama.create_chat_completion if endpoint == "chat" else llama.create_completion
        job = _Job()
        try:
            async with asyncio.timeout(self.cfg.timeout_s), self._lock:
                fut = asyncio.ensure_future(asyncio.to_thread(self._guarded, lambda _j: call(**kw), job))
                try:
                    data: dict[str, Any] = await asyncio.shield(fut)
                except asyncio.CancelledError:
                    job.cancel.set()  # stop at the next token; keep the lock until the thread is out
                    await asyncio.wait([fut])
                    raise
        except TimeoutError:
            raise UpstreamTimeout(f"provider {self.name}: no answer within {self.cfg.timeout_s}s") from None
        except Exception as e:
            raise self._error(e) from e
        data["model"] = payload.get("model", data.get("model"))
        return Reply(status=200, body=orjson.dumps(data), data=data)

    async def stream(
        self, endpoint: Endpoint, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Chunk]:
        llama = self._require()
        kw = self._kwargs(endpoint, payload, stream=True)
        call = llama.create_chat_completion if endpoint == "chat" else llama.create_completion
        opts = payload.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        model = payload.get("model")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = _Job()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # event loop closed: nobody is listening any more
                job.cancel.set()

        def work(job: _Job) -> None:
            try:
                it = call(**kw)
                try:
                    for chunk in it:
                        if job.cancel.is_set():
                            break
                        put(("chunk", chunk))
                finally:
                    it.close()
            except BaseException as e:
                put(("error", e))
            else:
                put(("end", None))

        async with self._lock:
            fut = loop.run_in_executor(None, self._guarded, work, job)
            try:
                last: dict[str, Any] = {}
                while True:
                    kind, item = await queue.get()
                    if kind == "error":
                        raise self._error(item) from item
                    if kind == "end":
                        break
                    last = item
                    item["model"] = model
                    if include_usage:
                        item["usage"] = None
                    yield Chunk(raw=b"data: " + orjson.dumps(item) + b"\n\n", data=item)
                if include_usage:
                    p, c = job.prompt_tokens, job.completion_tokens
                    final = {
                        "id": last.get("id", f"cmpl-{time.time_ns()}"),
                        "object": last.get(
                            "object", "chat.completion.chunk" if endpoint == "chat" else "text_completion"
                        ),
                        "created": last.get("created", int(time.time())),
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                    }
                    yield Chunk(raw=b"data: " + orjson.dumps(final) + b"\n\n", data=final)
                yield _DONE
            finally:
                # Consumer finished, failed or went away (aclose/GeneratorExit/cancel): stop the
                # thread at its next token and keep the lock until it has really left llama.cpp.
                job.cancel.set()
                with contextlib.suppress(BaseException):
                    await asyncio.wait([fut])
