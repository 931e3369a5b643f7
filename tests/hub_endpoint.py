"""A local stand-in for the Hugging Face Hub's HTTP API, enough for `HfApi.create_repo` and
`create_commit` (the machines that run the tests cannot reach huggingface.co): it records each repo
created and each commit with its files, and can be told to fail the first N commits.

Point a client at it with `HF_ENDPOINT=http://127.0.0.1:PORT`. Every file is asked to be uploaded
"regular" (inline, base64, in the commit), so no LFS or Xet storage is involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    authorization: str | None


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail_commits: int = 0  # answer the next N commits with HTTP 503


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            hub.requests.append(("GET", self.path))
            self._reply(404, {"error": "not found"})

        def do_POST(self):
            hub.requests.append(("POST", self.path))
            body = self._body()
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:3] == ["api", "repos", "create"]:
                spec = json.loads(body)
                repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                hub.repos[repo_id] = spec
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            if parts[:2] == ["api", "validate-yaml"]:  # the model card's front matter
                return self._reply(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and "preupload" in parts:
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    },
                )
            if parts[:2] == ["api", "models"] and "commit" in parts:
                at = parts.index("commit")
                repo_id, revision = "/".join(parts[2:at]), "/".join(parts[at + 1 :])
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self._reply(503, {"error": "the Hub is busy"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                hub.commits.append(
                    Commit(repo_id, revision, header.get("summary", ""), files, self.headers.get("Authorization"))
                )
                oid = hashlib.sha1(repr(sorted(files)).encode() + str(len(hub.commits)).encode()).hexdigest()
                return self._reply(
                    200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
                )
            self._reply(404, {"error": f"no route {self.path}"})

    return Handler


class running_hub:
    """`with running_hub() as hub:` a FakeHub serving on a free loopback port."""

    def __enter__(self) -> FakeHub:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
