"""A Hugging Face Hub stand-in on 127.0.0.1 for the push / download tests, and small models.

FakeHub answers the part of the Hub HTTP API that huggingface_hub's create_repo,
create_branch, upload_folder (preupload, then an NDJSON commit with the files inline in
base64) and hf_hub_download (HEAD then GET of /{repo}/resolve/{revision}/{path}) use, keeps
the committed files per repo and revision, and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import timm
import torch
import transformers
from torch import nn


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: Dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class FakeHub:
    """Run with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint to give huggingface_hub."""

    requests: List[RecordedRequest] = field(default_factory=list)
    repos: Dict[str, Dict[str, Any]] = field(
        default_factory=dict
    )  # repo_id -> {"private": ..., "branches": {rev: {path: bytes}}}
    commits: int = 0

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                headers = {key.lower(): value for key, value in self.headers.items()}
                request = RecordedRequest(self.command, unquote(parts.path), parts.query, headers, body)
                with lock:
                    hub.requests.append(request)
                    status, headers, payload = hub.answer(request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = do_PUT = _handle

        lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- the API --------------------------------------------------------------------------------

    def answer(self, request: RecordedRequest) -> Tuple[int, Dict[str, str], bytes]:
        for method, prefix, handler in self._routes():
            if request.method == method and request.path.startswith(prefix):
                return handler(request, request.path[len(prefix) :])
        return _json(404, {"error": f"FakeHub has no route for {request.method} {request.path}"})

    def _routes(self) -> List[Tuple[str, str, Callable[[RecordedRequest, str], Tuple[int, Dict[str, str], bytes]]]]:
        return [
            ("POST", "/api/repos/create", self._create_repo),
            ("POST", "/api/validate-yaml", lambda request, rest: _json(200, {})),
            ("POST", "/api/models/", self._model_api),
            ("HEAD", "/", self._resolve),
            ("GET", "/", self._resolve),
        ]

    def _create_repo(self, request: RecordedRequest, rest: str) -> Tuple[int, Dict[str, str], bytes]:
        payload = request.json()
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:  # the Hub answers 409 with the url; create_repo(exist_ok=True) reads it
            return _json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = {"visibility": payload.get("visibility"), "branches": {"main": {}}}
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _model_api(self, request: RecordedRequest, rest: str) -> Tuple[int, Dict[str, str], bytes]:
        # rest = "{owner}/{name}/{action}/{revision}"
        owner, name, action, revision = rest.split("/", 3)
        repo = self.repos.get(f"{owner}/{name}")
        if repo is None:
            return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        branches = repo["branches"]
        if action == "branch":
            branches.setdefault(revision, dict(branches["main"]))
            return _json(200, {})
        if revision not in branches:
            return _json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        if action == "preupload":
            files = [
                {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for entry in request.json()["files"]
            ]
            return _json(200, {"files": files, "commitOid": _sha(b"")})
        if action == "commit":
            for item in request.ndjson():
                if item["key"] == "file":
                    branches[revision][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.commits += 1
            oid = _sha(str(self.commits).encode())
            return _json(
                200, {"commitUrl": f"{self.url}/{owner}/{name}/commit/{oid}", "commitOid": oid, "success": True}
            )
        return _json(404, {"error": f"unknown action {action}"})

    def _resolve(self, request: RecordedRequest, rest: str) -> Tuple[int, Dict[str, str], bytes]:
        # rest = "{owner}/{name}/resolve/{revision}/{path}"
        owner, name, resolve, revision, path = (rest.split("/", 4) + [""] * 5)[:5]
        repo = self.repos.get(f"{owner}/{name}")
        if resolve != "resolve" or repo is None:
            return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        files = repo["branches"].get(revision)
        if files is None:
            return _json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        commit = _sha(f"{owner}/{name}@{revision}".encode())
        if path not in files:
            return _json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        content = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_sha(content)}"', "Content-Type": "application/octet-stream"}
        return 200, headers, content

    # --- what the tests read --------------------------------------------------------------------

    def find(self, method: str, path_part: str) -> List[RecordedRequest]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        return self.repos[repo_id]["branches"][revision]


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _json(status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def loopback_only(monkeypatch) -> List[Any]:
    """Refuse (and record) every socket connection that is not to 127.0.0.1, and turn off
    huggingface_hub's telemetry (its user agent fetches a registry from the default endpoint).
    Returns the list of refused addresses."""
    import huggingface_hub.constants

    refused: List[Any] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            refused.append(address)
            raise ConnectionRefusedError(f"tests allow loopback connections only, not {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return refused


# --- small real models ----------------------------------------------------------------------------

NUM_CLASSES = 4


@dataclass
class HubCase:
    """A small real model, its inputs, and how to read its output."""

    build: Callable[[], nn.Module]
    size: int
    transformers: bool = False

    def inputs(self, n: int) -> torch.Tensor:
        return torch.randn(n, 3, self.size, self.size)

    def output(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return model(pixel_values=x, **kwargs).logits if self.transformers else model(x, **kwargs)


HUB_CASES: Dict[str, HubCase] = {
    "hf_vit": HubCase(
        lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=NUM_CLASSES,
            )
        ),
        32,
        transformers=True,
    ),
    "hf_resnet": HubCase(
        lambda: transformers.ResNetForImageClassification(
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_CLASSES)
        ),
        32,
        transformers=True,
    ),
    "resnet18": HubCase(lambda: timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES), 32),
    "densenet121": HubCase(lambda: timm.create_model("densenet121", pretrained=False, num_classes=NUM_CLASSES), 32),
    "vit_tiny_patch16_224": HubCase(
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32), 32
    ),
}
