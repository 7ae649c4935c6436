"""A local stand-in for the Hub's HTTP endpoints that ``Dataset.push_to_hub`` calls (legacy LFS path).

Implements: repo info and creation, preupload (every file goes through LFS), the LFS batch and PUT
upload, commit (NDJSON: inline files, LFS pointers, deletions), tree listing, paths-info and resolve.
Everything committed is kept in ``FakeHub.files`` (path -> bytes) for the test to assert on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sha(self, repo: str) -> str:
        return hashlib.sha1(str(len(self.commits)).encode() + repo.encode()).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload=None, raw: bytes | None = None, headers: dict | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self, code: str = "EntryNotFound") -> None:
            self._send(404, {"error": "not found"}, headers={"X-Error-Code": code, "X-Error-Message": "not found"})

        def do_GET(self):
            self._route("GET", b"")

        def do_HEAD(self):
            self._route("HEAD", b"")

        def do_POST(self):
            self._route("POST", self._body())

        def do_PUT(self):
            self._route("PUT", self._body())

        def _route(self, method: str, body: bytes) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{method} {path}")
            if method == "POST" and path == "/api/repos/create":
                request = json.loads(body)
                repo = f"{request.get('organization') or 'user'}/{request['name']}"
                hub.repos.setdefault(repo, {})
                return self._send(200, {"url": f"{hub.endpoint}/datasets/{repo}", "name": repo})
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if method == "GET" and path == "/api/whoami-v2":
                return self._send(200, {"name": "user", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if match and method == "GET":
                repo = match.group(1)
                if repo not in hub.repos:
                    return self._not_found("RepoNotFound")
                siblings = [{"rfilename": name} for name in hub.repos[repo]]
                return self._send(200, {"id": repo, "sha": hub.sha(repo), "siblings": siblings, "private": False})
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
            if match:
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "lfs", "shouldIgnore": False} for f in files]})
            match = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if match:
                objects = json.loads(body)["objects"]
                return self._send(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}"}}}
                    for o in objects]})
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]+)", path)
            if match and method == "PUT":
                assert hashlib.sha256(body).hexdigest() == match.group(1), "LFS upload content does not match its oid"
                hub.lfs[match.group(1)] = body
                return self._send(200, {})
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
            if match:
                return self._commit(match.group(1), body)
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if match:
                repo, prefix = match.group(1), (match.group(3) or "").strip("/")
                files = hub.repos.get(repo, {})
                inside = {name: data for name, data in files.items() if not prefix or name.startswith(prefix + "/")}
                if prefix and not inside:
                    return self._not_found()
                folders = {name.rsplit("/", 1)[0] for name in inside if "/" in name} - {prefix}
                entries = [{"type": "directory", "path": name, "oid": "0" * 40} for name in sorted(folders)]
                entries += [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in inside.items()]
                return self._send(200, entries)
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
            if match:
                files = hub.repos.get(match.group(1), {})
                wanted = _form_paths(body)
                return self._send(200, [{"type": "file", "path": p, "size": len(files[p]), "oid": hashlib.sha1(files[p]).hexdigest()}
                                        for p in wanted if p in files])
            match = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match:
                files = hub.repos.get(match.group(1), {})
                name = match.group(3)
                if name not in files:
                    return self._not_found()
                data = files[name]
                return self._send(200, raw=data, headers={"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                          "X-Repo-Commit": hub.sha(match.group(1))})
            if method in ("GET", "HEAD"):
                return self._not_found()
            self._send(501, {"error": f"fake hub does not implement {method} {path}"})

        def _commit(self, repo: str, body: bytes) -> None:
            files = hub.repos.setdefault(repo, {})
            record = {"repo": repo, "added": [], "deleted": []}
            for line in body.decode().splitlines():
                entry = json.loads(line)
                value = entry["value"]
                if entry["key"] == "header":
                    record["summary"] = value.get("summary")
                elif entry["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    record["added"].append(value["path"])
                elif entry["key"] == "lfsFile":
                    files[value["path"]] = hub.lfs[value["oid"]]
                    record["added"].append(value["path"])
                elif entry["key"] == "deletedFile":
                    files.pop(value["path"], None)
                    record["deleted"].append(value["path"])
            hub.commits.append(record)
            sha = hub.sha(repo)
            self._send(200, {"commitUrl": f"{hub.endpoint}/datasets/{repo}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None, "commitMessage": record.get("summary")})

    return Handler


def _form_paths(body: bytes) -> list[str]:
    from urllib.parse import parse_qs

    text = body.decode()
    if text.startswith("{"):
        return json.loads(text).get("paths", [])
    return parse_qs(text).get("paths", [])
