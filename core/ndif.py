"""Remote models on NDIF (the National Deep Inference Fabric), reached through nnsight.

`Transport` sends the traced programs of `core.nnsight_backend` to NDIF and waits for their
results: it submits each request over HTTP and polls for its status (nnsight's non-blocking
mode, so no websocket is held open), with a deadline, and turns every way it can fail into a
`BackendError` that says what happened: refused (a bad or missing key, a request too large, the
model not served), timed out, unreachable, or failed on the server. `log` keeps, per request,
the bytes sent and received and the seconds it took.

Settings come from the environment: `NDIF_API_KEY` (the key; https://login.ndif.us), `NDIF_HOST`
(default https://api.ndif.us), `CIRCUIT_EXPLORER_NDIF_TIMEOUT` (seconds to wait for one request,
default 600) and `CIRCUIT_EXPLORER_NDIF_TOKENS` (tokens in one request: rows × prompt length,
default 4096; a sweep is cut into requests of at most that many).

A remote model is built here on the meta device from its config and tokenizer (downloaded from
the Hugging Face hub, a few MB); its weights stay on NDIF.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core.backend import BackendError

DEFAULT_HOST = "https://api.ndif.us"
DEFAULT_TIMEOUT = 600.0
DEFAULT_TOKENS = 4096
STATUS_TIMEOUT = 3.0  # seconds to reach NDIF's model list before saying it cannot be reached


class RemoteRefused(BackendError):
    """NDIF answered and said no."""


class RemoteTimeout(BackendError):
    """No answer in time."""


class RemoteUnreachable(BackendError):
    """NDIF could not be reached at all."""


class RemoteFailed(BackendError):
    """The request ran on NDIF and failed there."""


@dataclass(frozen=True)
class Settings:
    host: str
    api_key: str
    timeout: float
    tokens_per_request: int

    @property
    def has_key(self) -> bool:
        return bool(self.api_key)


def settings() -> Settings:
    def number(name: str, default: float) -> float:
        try:
            value = float(os.environ.get(name, default))
        except ValueError:
            return default
        return value if value > 0 else default

    return Settings(host=os.environ.get("NDIF_HOST", DEFAULT_HOST).rstrip("/"),
                    api_key=os.environ.get("NDIF_API_KEY", ""),
                    timeout=number("CIRCUIT_EXPLORER_NDIF_TIMEOUT", DEFAULT_TIMEOUT),
                    tokens_per_request=int(number("CIRCUIT_EXPLORER_NDIF_TOKENS", DEFAULT_TOKENS)))


NO_KEY = ("Remote models need an NDIF API key: get one at https://login.ndif.us and start the app with "
          "NDIF_API_KEY=<your key> in its environment.")


def _unreachable(host: str, error: Exception) -> RemoteUnreachable:
    return RemoteUnreachable(
        f"NDIF cannot be reached at {host} ({type(error).__name__}: {error}). Remote models need a network "
        "connection; models on this machine work without one.")


def served_models(s: Settings | None = None) -> list[str]:
    """The Hugging Face ids of the models NDIF serves now (deployed and running), sorted.

    Fails within `STATUS_TIMEOUT` seconds with `RemoteUnreachable` when NDIF cannot be reached."""
    import httpx
    s = s or settings()
    try:
        response = httpx.get(f"{s.host}/status", timeout=httpx.Timeout(STATUS_TIMEOUT))
        response.raise_for_status()
        body = response.json()
    except httpx.HTTPStatusError as e:
        raise RemoteRefused(f"NDIF's model list answered {e.response.status_code}.") from None
    except (httpx.HTTPError, OSError) as e:
        raise _unreachable(s.host, e) from None
    except ValueError:
        raise RemoteFailed("NDIF's model list was not JSON.") from None
    names = set()
    for key, value in (body.get("deployments") or {}).items():
        if not isinstance(value, dict):
            continue
        if value.get("deployment_level", "HOT") not in ("HOT", "WARM"):
            continue
        if value.get("application_state", "RUNNING") != "RUNNING":
            continue
        names.add(str(value.get("repo_id") or key))
    return sorted(names)


@dataclass
class Request:
    """One request as sent: what it computed, bytes each way, seconds, and how it ended."""

    what: str
    sent: int = 0
    received: int = 0
    seconds: float = 0.0
    status: str = "sent"
    job_id: str | None = None


@dataclass
class Transport:
    """Sends traced programs to NDIF (or to `host`, e.g. a stand-in in tests) and waits."""

    settings: Settings = field(default_factory=settings)
    poll_every: float = 0.25
    on_status: Callable[[str], None] | None = None
    log: list[Request] = field(default_factory=list)
    name: str = "NDIF"

    def rows_per_request(self, n_pos: int) -> int:
        return max(1, self.settings.tokens_per_request // max(1, n_pos))

    def backend(self, lm, what: str):
        """The nnsight backend object for one request of model `lm` (a meta-built TransformersModel)."""
        from nnsight.intervention.backends.remote import RemoteBackend
        transport, request = self, Request(what)
        self.log.append(request)

        class Remote(RemoteBackend):
            def _serialize(self, tracer):
                blob = super()._serialize(tracer)
                request.sent = len(blob)
                return blob

            def finalize(self, content: bytes):
                request.received = len(content)
                return super().finalize(content)

            def __call__(self, tracer=None):
                request.started = time.perf_counter()
                try:
                    return super().__call__(tracer)
                except BackendError:
                    raise
                except Exception as e:  # noqa: BLE001 - every failure is told to the user
                    request.status = "failed to send"
                    raise transport._explain(e) from None

        be = Remote(lm.to_model_key(), host=self.settings.host, api_key=self.settings.api_key or None,
                    env=lm._remoteable_get_env(), blocking=False)
        be.display.enabled = False
        be.request = request
        return be

    def _explain(self, error: Exception) -> BackendError:
        import httpx
        from nnsight.intervention.backends.remote import RemoteError
        cause = error.__cause__ if isinstance(error, RemoteError) and error.__cause__ is not None else error
        if isinstance(cause, httpx.HTTPStatusError):
            code = cause.response.status_code
            detail = str(error).removeprefix("Failed to send request: ")
            hint = " Check NDIF_API_KEY." if code in (401, 403) else ""
            return RemoteRefused(f"NDIF refused the request (HTTP {code}): {detail}.{hint}")
        if isinstance(cause, httpx.TimeoutException):
            return RemoteTimeout(f"NDIF did not answer in time ({type(cause).__name__}). Try again, or a shorter prompt.")
        if isinstance(cause, (httpx.HTTPError, OSError)):
            return _unreachable(self.settings.host, cause)
        if isinstance(error, RemoteError):
            return RemoteFailed(f"The request failed on NDIF: {error}")
        return RemoteFailed(f"The request could not be sent to NDIF: {type(error).__name__}: {error}")

    def wait(self, be, shapes: dict) -> dict:
        """Poll until the request's result is in, the server reports an error, or the deadline."""
        request: Request = be.request
        request.job_id = be.job_id
        start = getattr(request, "started", time.perf_counter())
        deadline = start + self.settings.timeout
        delay = self.poll_every
        while True:
            try:
                result = be.poll()
            except BackendError:
                raise
            except Exception as e:  # noqa: BLE001
                request.status = "failed"
                raise self._explain(e) from None
            finally:
                request.seconds = time.perf_counter() - start
            if result is not None:
                request.status = "done"
                return result
            if self.on_status is not None and be.status is not None:
                self.on_status(f"{request.what}: {be.status.value.lower()} ({request.seconds:.0f} s)")
            if time.perf_counter() + delay > deadline:
                request.status = "timed out"
                raise RemoteTimeout(
                    f"NDIF did not finish the {request.what} request in {self.settings.timeout:.0f} s "
                    f"(job {be.job_id}; last status: {be.status.value if be.status else 'none'}). It may be busy: "
                    "try again later, or set CIRCUIT_EXPLORER_NDIF_TIMEOUT to wait longer.")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)


def remote_model(repo_id: str):
    """An nnsight model of `repo_id` for remote runs: built on the meta device (no weights) from
    its config and tokenizer, with eager attention so NDIF returns attention weights."""
    import nnsight.modeling.huggingface as hf
    from nnsight import TransformersModel

    # nnsight asks the hub for the canonical spelling of the id before each first request; the
    # ids NDIF lists are canonical already, and this keeps a request from needing the hub too.
    from core.paths import hub_offline, hub_reachable
    hf._ID_CACHE.setdefault(repo_id, repo_id)
    from huggingface_hub import snapshot_download

    from core.checkpoints import TOKENIZER_FILES
    from core.models import load_tokenizer
    try:
        with hub_offline(not hub_reachable()):  # offline: the local hub cache, or a quick refusal
            folder = snapshot_download(repo_id, allow_patterns=["config.json", *TOKENIZER_FILES])
            tokenizer = load_tokenizer(Path(folder))
            return TransformersModel(repo_id, task="text-generation", attn_implementation="eager",
                                     tokenizer=tokenizer)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated repo: all told to the user
        raise BackendError(
            f"Could not read {repo_id}'s config and tokenizer from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A remote model still needs "
            "those two small files here.") from None


class DryRun(Transport):
    """Counts what a sweep would send without sending it: each request is serialized exactly as
    `Transport` would send it; the answer is random numbers of the shapes the view saves, and
    its size is what NDIF would send back (compressed as NDIF compresses it)."""

    def backend(self, lm, what: str):
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.backend import Backend as NNBackend
        request = Request(what)
        self.log.append(request)

        class Capture(NNBackend):
            def __call__(self, tracer=None):
                from nnsight.ndif import pull_env
                pull_env()
                request.sent = len(RequestModel.serialize(tracer, compress=True))

        be = Capture()
        be.request = request
        return be

    def wait(self, be, shapes: dict) -> dict:
        import zstandard
        gen = torch.Generator().manual_seed(len(self.log))
        out = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items() if shape is not None}
        buf = io.BytesIO()
        torch.save(out, buf, pickle_protocol=4)
        be.request.received = len(zstandard.ZstdCompressor(level=6).compress(buf.getvalue()))
        be.request.status = "counted"
        return out
