"""A local stand-in for NDIF at the HTTP boundary, for tests: no network.

It speaks the endpoints nnsight's `RemoteBackend` uses in non-blocking mode: POST /request (the
request envelope and the serialized trace, as multipart form data), GET /response/<id> (the job's
status as nnsight's `ResponseModel`), GET /result/<id> (the saved values, `torch.save`d and
zstd-compressed as NDIF sends them) and GET /status (the deployed models).

`StandinProcess` runs it in a process of its own, as NDIF is: `core` cannot be imported there
(so a request that needs this package's code fails, as it would on NDIF), nnsight's caches start
empty, and each request is deserialized and run on a model loaded from a checkpoint folder, with its
weights frozen as NDIF's are. Submissions without nnsight's version headers are refused.

Failure modes, set with `mode`: "refuse" (HTTP 401 with a reason), "refuse_in_body" (HTTP 200 with an ERROR status, as NDIF
answers a bad key), "too_large" (HTTP 413),
"stall" (the job never finishes), "hang" (status requests get no answer for `hang` seconds),
"flaky" (each job's first two status requests answer 503), "error_after" (after `ok_jobs` more
jobs, jobs end in ERROR), "no_data" (COMPLETED without a result), "bad_result" (the result is
not what torch saved). `control(grad=False)` runs requests with gradients off.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx


class Standin:
    """The server. `models`: NDIF model key -> nnsight TransformersModel with weights."""

    def __init__(self, models: dict):
        from nnsight.schema.response import ResponseModel, Status

        self.models = models
        self.mode, self.ok_jobs, self.hang = "ok", 0, 0.0
        self.grad = True  # False: run requests under torch.no_grad, as a server may
        self.jobs: dict = {}
        self.polls: dict[str, int] = {}
        self.results: dict[str, bytes] = {}
        self.received: list[dict] = []  # per POST: model key, bytes, api key
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, value) -> None:
                self._send(code, json.dumps(value).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/_control":
                    control = json.loads(body)
                    standin.mode = control.get("mode", standin.mode)
                    standin.ok_jobs = control.get("ok_jobs", 0)
                    standin.hang = control.get("hang", 0.0)
                    standin.grad = control.get("grad", True)
                    return self._json(200, {})
                from nnsight.schema.request import RequestModel
                head = b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n"
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
                parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                         for p in message.iter_parts()}
                meta = RequestModel.model_validate_json(parts["data"])
                standin.received.append({"model_key": meta.model_key, "bytes": len(parts["blob"]),
                                         "api_key": self.headers.get("ndif-api-key"), "env": meta.env})
                if not self.headers.get("nnsight-version") or not self.headers.get("python-version"):
                    return self._json(400, {"detail": "nnsight-version and python-version headers are required"})
                if standin.mode == "refuse":
                    return self._json(401, {"detail": "Invalid API key"})
                if standin.mode == "refuse_in_body":  # as NDIF answers most refusals: 200, status ERROR
                    return self._send(200, ResponseModel(
                        id=uuid.uuid4().hex, status=Status.ERROR,
                        description="Traceback (most recent call last):\n  ...\nException: Invalid API key. "
                                    "Get one at https://login.ndif.us").model_dump_json().encode())
                if standin.mode == "too_large":
                    return self._json(413, {"detail": "Request too large"})
                if meta.model_key not in standin.models:
                    return self._json(400, {"detail": f"Model {meta.model_key} is not deployed"})
                job = uuid.uuid4().hex
                standin.jobs[job] = ResponseModel(id=job, status=Status.QUEUED)
                if standin.mode != "stall":
                    threading.Thread(target=standin.run, args=(job, meta, parts["blob"]), daemon=True).start()
                self._send(200, ResponseModel(id=job, status=Status.RECEIVED).model_dump_json().encode())

            def do_GET(self):
                if self.path == "/status":
                    deployments = {}
                    for key in standin.models:
                        repo = json.loads(key.split(":", 1)[1])["repo_id"]
                        deployments[repo] = {"model_key": key, "repo_id": repo, "deployment_level": "HOT",
                                             "application_state": "RUNNING"}
                    return self._json(200, {"deployments": deployments})
                if self.path == "/_received":
                    return self._json(200, standin.received)
                job = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/response/") and job in standin.jobs:
                    if standin.mode == "hang":
                        time.sleep(standin.hang)
                    standin.polls[job] = standin.polls.get(job, 0) + 1
                    if standin.mode == "flaky" and standin.polls[job] <= 2:
                        return self._json(503, {"detail": "Service Unavailable"})
                    return self._send(200, standin.jobs[job].model_dump_json().encode())
                if self.path.startswith("/result/") and job in standin.results:
                    if standin.mode == "bad_result":
                        return self._send(200, b"this is not a result", "application/octet-stream")
                    return self._send(200, standin.results[job], "application/octet-stream")
                self._json(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run(self, job: str, meta, blob: bytes) -> None:
        """Deserialize and run one request on its model, as NDIF does."""
        import torch
        import zstandard
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import ResponseModel, Status
        from nnsight.tracing.tracer import _saves, dec, inc

        with self.lock:
            if self.mode == "error_after":
                if self.ok_jobs <= 0:
                    self.jobs[job] = ResponseModel(id=job, status=Status.ERROR, description="CUDA out of memory")
                    return
                self.ok_jobs -= 1
            lm = self.models[meta.model_key]
            lm._remoteable_set_env(meta.env)
            try:
                tracer = RequestModel.deserialize(blob, lm._remoteable_persistent_objects(), compress=meta.compress)
                inc()
                try:
                    with torch.set_grad_enabled(self.grad):
                        tracer.execute(tracer.info.code)
                    saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in _saves()}
                finally:
                    dec()
            except Exception as e:  # noqa: BLE001 - the server reports a failing trace as an ERROR status
                self.jobs[job] = ResponseModel(id=job, status=Status.ERROR, description=f"{type(e).__name__}: {e}")
                return
            buf = io.BytesIO()
            torch.save(saves, buf)
            data = buf.getvalue()
            if meta.compress:
                data = zstandard.ZstdCompressor().compress(data)
            self.results[job] = data
            url = None if self.mode == "no_data" else f"{self.url}/result/{job}"
            self.jobs[job] = ResponseModel(id=job, status=Status.COMPLETED, data=url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StandinProcess:
    """The stand-in in a process of its own: `models` maps NDIF model keys to checkpoint folders."""

    def __init__(self, models: dict[str, Path]):
        args = [f"{key}={folder}" for key, folder in models.items()]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                                     stdout=subprocess.PIPE, text=True, cwd="/")
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"the NDIF stand-in did not start: {line!r}")
        self.url = line

    def control(self, **values) -> None:
        httpx.post(f"{self.url}/_control", content=json.dumps(values), timeout=10).raise_for_status()

    @property
    def mode(self) -> str:  # write-only in practice; kept readable for symmetry
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        self.control(mode=value)

    @property
    def received(self) -> list[dict]:
        return httpx.get(f"{self.url}/_received", timeout=10).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main(argv: list[str]) -> None:
    sys.modules["core"] = None  # as on NDIF: this package is not installed there
    from nnsight import TransformersModel
    from transformers import PreTrainedTokenizerFast

    models = {}
    for arg in argv:
        key, folder = arg.split("=", 1)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        models[key] = TransformersModel(folder, task="text-generation", dispatch=True, tokenizer=tokenizer)
        models[key]._module.requires_grad_(False)  # NDIF serves frozen weights
    standin = Standin(models)
    print(standin.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        standin.close()


if __name__ == "__main__":
    main(sys.argv[1:])
