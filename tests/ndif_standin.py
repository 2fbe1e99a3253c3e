"""A local stand-in for NDIF at the HTTP boundary, for tests: no network.

It speaks the endpoints nnsight's `RemoteBackend` uses in non-blocking mode: POST /request (the
request envelope and the serialized trace, as multipart form data), GET /response/<id> (the job's
status as nnsight's `ResponseModel`), GET /result/<id> (the saved values, `torch.save`d and
zstd-compressed as NDIF sends them) and GET /status (the deployed models). Each request is
deserialized and run on a model of its own, as NDIF runs it, so a passing test means the trace
really travels.

Failure modes, set on `mode`: "refuse" (HTTP 401 with a reason), "stall" (the job never
finishes), "error_after" (jobs after the first `ok_jobs` end in ERROR), "bad_result" (the result
download answers 500).
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import zstandard
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.tracer import _saves, dec, inc


class Standin:
    def __init__(self, models: dict):
        self.models = models  # model key -> nnsight TransformersModel with weights
        self.mode = "ok"
        self.ok_jobs = 1
        self.jobs: dict[str, ResponseModel] = {}
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

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                head = b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n"
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
                parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                         for p in message.iter_parts()}
                meta = RequestModel.model_validate_json(parts["data"])
                standin.received.append({"model_key": meta.model_key, "bytes": len(parts["blob"]),
                                         "api_key": self.headers.get("ndif-api-key")})
                if standin.mode == "refuse":
                    return self._send(401, json.dumps({"detail": "Invalid API key"}).encode())
                job = uuid.uuid4().hex
                standin.jobs[job] = ResponseModel(id=job, status=Status.QUEUED)
                if standin.mode != "stall":
                    threading.Thread(target=standin.run, args=(job, meta, parts["blob"]), daemon=True).start()
                self._send(200, ResponseModel(id=job, status=Status.RECEIVED).model_dump_json().encode())

            def do_GET(self):
                if self.path == "/status":
                    deployments = {key.split('"repo_id": "')[1].split('"')[0]: {
                        "model_key": key, "repo_id": key.split('"repo_id": "')[1].split('"')[0],
                        "deployment_level": "HOT", "application_state": "RUNNING"} for key in standin.models}
                    return self._send(200, json.dumps({"deployments": deployments}).encode())
                job = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/response/") and job in standin.jobs:
                    return self._send(200, standin.jobs[job].model_dump_json().encode())
                if self.path.startswith("/result/") and job in standin.results:
                    if standin.mode == "bad_result":
                        return self._send(500, b'{"detail": "object store unavailable"}')
                    return self._send(200, standin.results[job], "application/octet-stream")
                self._send(404, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run(self, job: str, meta: RequestModel, blob: bytes) -> None:
        with self.lock:
            done = sum(r.status == Status.COMPLETED for r in self.jobs.values())
            if self.mode == "error_after" and done >= self.ok_jobs:
                self.jobs[job] = ResponseModel(id=job, status=Status.ERROR, description="CUDA out of memory")
                return
            lm = self.models[meta.model_key]
            lm._remoteable_set_env(meta.env)
            try:
                tracer = RequestModel.deserialize(blob, lm._remoteable_persistent_objects(), compress=meta.compress)
                inc()
                try:
                    tracer.execute(tracer.info.code)
                    saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in _saves()}
                finally:
                    dec()
            except Exception as e:  # the server reports a failing trace as an ERROR status
                self.jobs[job] = ResponseModel(id=job, status=Status.ERROR, description=f"{type(e).__name__}: {e}")
                return
            buf = io.BytesIO()
            torch.save(saves, buf)
            data = buf.getvalue()
            if meta.compress:
                data = zstandard.ZstdCompressor().compress(data)
            self.results[job] = data
            self.jobs[job] = ResponseModel(id=job, status=Status.COMPLETED, data=f"{self.url}/result/{job}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
