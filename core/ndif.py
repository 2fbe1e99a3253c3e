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
        return value if 0 < value < float("inf") else default

    return Settings(host=os.environ.get("NDIF_HOST", DEFAULT_HOST).rstrip("/"),
                    api_key=os.environ.get("NDIF_API_KEY", ""),
                    timeout=number("CIRCUIT_EXPLORER_NDIF_TIMEOUT", DEFAULT_TIMEOUT),
                    tokens_per_request=max(1, int(number("CIRCUIT_EXPLORER_NDIF_TOKENS", DEFAULT_TOKENS))))


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
    deployments = body.get("deployments") if isinstance(body, dict) else None
    if not isinstance(deployments, dict):
        raise RemoteFailed("NDIF's model list had no deployments in it.")
    names = set()
    for key, value in deployments.items():
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
    started: float = field(default_factory=time.perf_counter)  # the deadline counts from here


RETRY_STATUS = (429, 500, 502, 503, 504)  # busy or briefly down: a status or result asked again
RETRY_SUBMIT = (429, 503)  # refused before it was queued: a submission sent again (never a 5xx that may have queued it)
CONNECT_TIMEOUT = 10.0


@dataclass
class Transport:
    """Sends traced programs to NDIF (or to `host`, e.g. a stand-in in tests) and waits.

    A request is serialized while the model's lock is held (in the trace's exit) and sent, polled
    and downloaded in `wait`, outside it, so one session's slow request never holds up another's
    page. Every HTTP call of a request is bounded by what is left of one deadline,
    `settings.timeout` seconds from the serialization. A busy service is asked again until the
    deadline (a submission only on 429 and 503, which mean it was not queued); any other refusal
    ends the request at once with the service's reason.
    """

    settings: Settings = field(default_factory=settings)
    poll_every: float = 0.25
    on_status: Callable[[str], None] | None = None
    log: list[Request] = field(default_factory=list)
    name: str = "NDIF"
    done: dict = field(default_factory=dict)  # results of finished sweep requests, by what they computed

    MAX_DONE = 512

    def remember(self, key, value) -> None:
        self.done[key] = value
        while len(self.done) > self.MAX_DONE:
            self.done.pop(next(iter(self.done)))

    def rows_per_request(self, n_pos: int) -> int:
        return max(1, self.settings.tokens_per_request // max(1, n_pos))

    def backend(self, lm, what: str, eager: bool = False):
        """The nnsight backend object for one request of model `lm` (a meta-built TransformersModel).

        `eager`: run the request with eager attention (the attention view reads its weights);
        otherwise the faster SDPA, except on models that soft-cap attention logits (Gemma 2),
        which need eager attention to be computed right."""
        from nnsight.intervention.backends.remote import RemoteBackend
        request = Request(what)
        self.log.append(request)

        class Remote(RemoteBackend):
            def __call__(self, tracer=None):
                """Serialize only: `Transport.wait` sends it, outside the model's lock."""
                request.started = time.perf_counter()
                try:
                    self.blob = self._serialize(tracer)
                except Exception as e:  # noqa: BLE001 - every failure is told to the user
                    request.status = "not serialized"
                    raise RemoteFailed(f"The {what} request could not be prepared for NDIF: {type(e).__name__}: {e}") from None
                request.sent = len(self.blob)
                return None

        try:
            key = lm.to_model_key()
        except Exception as e:  # noqa: BLE001 - a local folder has no id NDIF knows
            raise BackendError(f"This model has no Hugging Face id NDIF could know it by ({type(e).__name__}: {e}).") from None
        config = lm._module.config
        softcaps = getattr(config, "attn_logit_softcapping", None) is not None
        env = {**lm._remoteable_get_env(), "attn_implementation": "eager" if eager or softcaps else "sdpa"}
        be = Remote(key, host=self.settings.host, api_key=self.settings.api_key or None, env=env, blocking=False)
        be.display.enabled = False
        be.ce_request = request
        return be

    # -- HTTP, all under one deadline -------------------------------------------------------------
    def _left(self, request: Request) -> float:
        return request.started + self.settings.timeout - time.perf_counter()

    def _timeout(self, request: Request, last: str) -> RemoteTimeout:
        request.status = "timed out"
        job = f"job {request.job_id}; " if request.job_id else ""
        return RemoteTimeout(
            f"NDIF did not finish the {request.what} request in {self.settings.timeout:.0f} s ({job}last: {last}). "
            "It may be busy: try again later, or set CIRCUIT_EXPLORER_NDIF_TIMEOUT to wait longer.")

    def _call(self, request: Request, method: str, url: str, what: str, retry=RETRY_STATUS, key: bool = True,
              **kwargs):
        """One HTTP call, asked again on the `retry` statuses and on connection failures until the
        deadline. Returns the response (2xx or 404); raises `RemoteRefused` for any other answer."""
        import httpx
        delay, last = self.poll_every, "no answer"
        headers = {**({"ndif-api-key": self.settings.api_key} if key and self.settings.api_key else {}),
                   **kwargs.pop("headers", {})}
        submitting = method == "POST"
        while True:
            left = self._left(request)
            if left <= 0:
                raise self._timeout(request, last)
            wait = delay
            try:
                with httpx.Client(timeout=httpx.Timeout(min(left, CONNECT_TIMEOUT), read=left),
                                  follow_redirects=True) as client:
                    response = client.request(method, url, headers=headers, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, OSError) as e:
                if submitting and not self.log_reached(request):  # never reached NDIF: say so at once
                    request.status = "unreachable"
                    raise _unreachable(self.settings.host, e) from None
                last = f"{what}: {type(e).__name__}"
            except httpx.TimeoutException:
                last = f"{what} got no answer in time"
                if submitting:  # the job may be queued: sending it again could run it twice
                    raise self._timeout(request, last) from None
            except httpx.HTTPError as e:
                if submitting:
                    request.status = "connection lost"
                    raise RemoteFailed(f"The connection to NDIF broke while sending the {request.what} request "
                                       f"({type(e).__name__}); the job may still run. Try again.") from None
                last = f"{what}: {type(e).__name__}"
            else:
                code = response.status_code
                if code < 400 or code == 404:
                    request.reached = True
                    return response
                if code not in retry:
                    request.status = f"refused ({code})"
                    raise RemoteRefused(self._refusal(code, response))
                last = f"{what}: HTTP {code}"
                try:
                    wait = max(delay, float(response.headers.get("Retry-After", 0)))
                except ValueError:
                    pass
            if self.on_status is not None:
                self.on_status(f"{request.what}: {last}, asking again")
            time.sleep(max(0.0, min(wait, self._left(request))))
            delay = min(delay * 1.5, 2.0)

    @staticmethod
    def log_reached(request: Request) -> bool:
        return getattr(request, "reached", False)

    @staticmethod
    def _refusal(code: int, response) -> str:
        try:
            body = response.json()
            detail = body.get("detail") if isinstance(body, dict) else body
        except ValueError:
            detail = response.text[:300] or None
        hint = {401: " Check NDIF_API_KEY.", 403: " Check NDIF_API_KEY.",
                413: " The request is too large: lower CIRCUIT_EXPLORER_NDIF_TOKENS or use a shorter prompt."}.get(code, "")
        return f"NDIF refused the request (HTTP {code}): {detail or response.reason_phrase}.{hint}"

    def _submit(self, be, request: Request):
        """POST the serialized request; the job id. NDIF answers a refusal (a bad key, an
        nnsight version it does not take, a full queue) as an ERROR status with a reason."""
        import sys

        from nnsight.intervention.backends.remote import _NNSIGHT_VERSION
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import Status
        envelope = RequestModel(model_key=be.model_key, compress=be.compress, env=be.env)
        headers = {"ndif-timestamp": repr(time.time()), "nnsight-version": _NNSIGHT_VERSION,
                   "python-version": sys.version}
        response = self._call(request, "POST", f"{self.settings.host}/request", "submission", retry=RETRY_SUBMIT,
                              data={"data": envelope.metadata()},
                              files={"blob": ("request", be.blob, "application/octet-stream")}, headers=headers)
        if response.status_code == 404:
            request.status = "refused (404)"
            raise RemoteRefused(f"NDIF has no request endpoint at {self.settings.host} (HTTP 404). Check NDIF_HOST.")
        answer = self._parse(request, response.text)
        if answer.status == Status.ERROR:
            request.status = "refused"
            reason = (answer.description or "no reason given").strip().splitlines()[-1]
            hint = " Check NDIF_API_KEY." if "key" in reason.lower() else ""
            raise RemoteRefused(f"NDIF refused the {request.what} request: {reason}.{hint}")
        request.job_id = answer.id
        return answer

    def _parse(self, request: Request, text: str):
        from nnsight.schema.response import ResponseModel
        try:
            return ResponseModel.model_validate_json(text)
        except ValueError:
            request.status = "bad answer"
            raise RemoteFailed(f"NDIF's answer to the {request.what} request could not be read: {text[:200]!r}") from None

    def wait(self, be, shapes: dict) -> dict:
        """Send the serialized request, poll until its result is in, the server reports an error,
        or the deadline."""
        from nnsight.schema.response import Status
        request: Request = be.ce_request
        delay, last = self.poll_every, "no status yet"
        try:
            self._submit(be, request)
            while True:
                response = self._call(request, "GET", f"{self.settings.host}/response/{request.job_id}", "status")
                if response.status_code != 404:  # 404: no status recorded yet
                    answer = self._parse(request, response.text)
                    if answer.status == Status.ERROR:
                        request.status = "failed"
                        raise RemoteFailed(f"The {request.what} request failed on NDIF: {answer.description}")
                    if answer.status == Status.COMPLETED:
                        return self._download(be, request, answer.data)
                    last = f"status {answer.status.value}"
                    if self.on_status is not None:
                        note = f": {answer.description}" if answer.description else ""
                        self.on_status(f"{request.what}: {answer.status.value.lower()}{note} "
                                       f"({time.perf_counter() - request.started:.0f} s)")
                if self._left(request) <= delay:
                    raise self._timeout(request, last)
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)
        finally:
            request.seconds = time.perf_counter() - request.started

    def _download(self, be, request: Request, data) -> dict:
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
            data = data[0]  # (url, size), as NDIF may send it
        if isinstance(data, (bytes, bytearray)):
            content = bytes(data)
        elif isinstance(data, str) and data:
            same_host = data.startswith(self.settings.host)  # a presigned URL elsewhere gets no key
            response = self._call(request, "GET", data, "result download", key=same_host)
            if response.status_code == 404:
                request.status = "result missing"
                raise RemoteFailed(f"NDIF finished the {request.what} request but its result is gone (HTTP 404).")
            content = response.content
        else:
            request.status = "no result"
            raise RemoteFailed(f"NDIF finished the {request.what} request but sent no result.")
        request.received = len(content)
        try:
            result = be.finalize(content)
        except Exception as e:  # noqa: BLE001 - a damaged result is told, not raised as a traceback
            request.status = "bad result"
            raise RemoteFailed(f"The result of the {request.what} request could not be read: {type(e).__name__}: {e}") from None
        if not isinstance(result, dict):
            request.status = "bad result"
            raise RemoteFailed(f"The result of the {request.what} request is not the saved values.")
        request.status = "done"
        return result


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

    def backend(self, lm, what: str, eager: bool = False):
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
        be.ce_request = request
        return be

    def remember(self, key, value) -> None:
        """Nothing is kept: a second identical sweep is counted again."""

    def wait(self, be, shapes: dict) -> dict:
        import zstandard
        gen = torch.Generator().manual_seed(len(self.log))
        # A primitive run (shape None) saves whatever it was asked for: counted as nothing here.
        out = {name: torch.randn(shape, generator=gen) if shape is not None else {} for name, shape in shapes.items()}
        buf = io.BytesIO()
        torch.save(out, buf, pickle_protocol=4)
        be.ce_request.received = len(zstandard.ZstdCompressor(level=6).compress(buf.getvalue()))
        be.ce_request.status = "counted"
        return out
