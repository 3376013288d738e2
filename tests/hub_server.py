"""A loopback server that speaks the part of the Hub's HTTP API huggingface_hub uses to create a repo and upload.

with HubServer() as hub:
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake"}  # set before huggingface_hub is imported

Endpoints: POST /api/repos/create (409 with "url" when the repo exists), GET /api/models/{repo}[/revision/{rev}],
POST /api/models/{repo}/preupload/{rev} (every file "regular", with the stored file's git oid so the client drops
unchanged files), POST /api/models/{repo}/commit/{rev} (NDJSON: a header line, then base64 file lines),
HEAD/GET /{repo}/resolve/{rev}/{path} (404 with X-Error-Code: EntryNotFound), POST /api/validate-yaml.
Files are kept in memory; `commits` counts the commits of each repo. Binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

MAX_BODY = 256 * 1024 * 1024


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class HubServer:
    def __init__(self, user: str = "user"):
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD path", for assertions
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # keep test output quiet; requests are recorded instead
                pass

            def _reply(self, status: int, body=None, headers: dict | None = None, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if raw is None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, message: str, code: str | None = None):
                self._reply(status, {"error": message}, {"X-Error-Code": code} if code else None)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ValueError("body too large")
                return self.rfile.read(length)

            def _route(self):
                with hub.lock:
                    hub.requests.append(f"{self.command} {self.path.split('?')[0]}")
                    hub.auth_headers.append(self.headers.get("authorization") or "")
                path = self.path.split("?")[0]
                try:
                    for pattern, method, fn in ROUTES:
                        m = re.fullmatch(pattern, path)
                        if m and method == self.command:
                            return fn(self, *m.groups())
                    self._error(404, f"no route for {self.command} {path}")
                except Exception as e:  # a bug in the fake must show up as a failed request, not a hang
                    self._error(500, f"{type(e).__name__}: {e}")

            do_GET = do_POST = do_HEAD = _route

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
                return repo

            def create(self):
                body = json.loads(self._body())
                if not self.headers.get("authorization"):
                    return self._error(401, "Invalid credentials in Authorization header")
                repo_id = f"{body.get('organization') or hub.user}/{body['name']}"
                url = f"{hub.url}/{repo_id}"
                if body["name"] == "refuse":  # echoes the request's credentials, as a careless server might
                    return self._error(400, f"refused for {self.headers.get('authorization')}")
                with hub.lock:
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": url})
                    hub.repos[repo_id] = Repo(repo_id, body.get("visibility") == "private")
                self._reply(200, {"url": url, "name": repo_id})

            def revision(self, repo_id, rev=None):
                if (repo := self._repo(repo_id)) is None:
                    return
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                self._reply(200, {"id": repo_id, "sha": repo.sha, "private": repo.private, "siblings": siblings})

            def preupload(self, repo_id, rev):
                if (repo := self._repo(repo_id)) is None:
                    return
                files = []
                for f in json.loads(self._body())["files"]:
                    entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    if f["path"] in repo.files:
                        entry["oid"] = git_oid(repo.files[f["path"]])
                    files.append(entry)
                self._reply(200, {"files": files, "commitOid": repo.sha})

            def commit(self, repo_id, rev):
                if (repo := self._repo(repo_id)) is None:
                    return
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                if not lines or lines[0]["key"] != "header":
                    return self._error(400, "the first NDJSON line must be the header")
                changes = {}
                for line in lines[1:]:
                    if line["key"] != "file" or line["value"].get("encoding") != "base64":
                        return self._error(400, f"unsupported commit line {line['key']}")
                    changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                with hub.lock:
                    repo.files.update(changes)
                    oid = hashlib.sha1(f"{repo.sha}{len(repo.commits)}{sorted(changes)}".encode()).hexdigest()
                    repo.commits.append(
                        {"oid": oid, "summary": lines[0]["value"]["summary"], "files": sorted(changes)}
                    )
                self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

            def resolve(self, repo_id, rev, filename):
                if (repo := self._repo(repo_id)) is None:
                    return
                if filename not in repo.files:
                    return self._error(404, "Entry not found", "EntryNotFound")
                data = repo.files[filename]
                headers = {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": repo.sha}
                self._reply(200, raw=data, headers=headers)

            def validate_yaml(self):
                content = json.loads(self._body())["content"]
                m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    meta = yaml.safe_load(m.group(1)) if m else None
                except yaml.YAMLError as e:
                    return self._reply(400, {"errors": [{"message": str(e)}]})
                if m and not isinstance(meta, dict):
                    return self._reply(400, {"errors": [{"message": "metadata must be a mapping"}]})
                warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
                self._reply(200, {"errors": [], "warnings": warnings})

        repo = r"([\w.-]+/[\w.-]+)"
        ROUTES = [
            (r"/api/repos/create", "POST", Handler.create),
            (rf"/api/models/{repo}(?:/revision/([^/]+))?", "GET", Handler.revision),
            (rf"/api/models/{repo}/preupload/([^/]+)", "POST", Handler.preupload),
            (rf"/api/models/{repo}/commit/([^/]+)", "POST", Handler.commit),
            (rf"/{repo}/resolve/([^/]+)/(.+)", "GET", Handler.resolve),
            (rf"/{repo}/resolve/([^/]+)/(.+)", "HEAD", Handler.resolve),
            (r"/api/validate-yaml", "POST", Handler.validate_yaml),
        ]
        return Handler
