"""deploy/nginx/comfy-courier.conf, run by a real nginx on loopback.

The shipped file is used as is, with only its listen port, upstream port and certificate
paths rewritten; nginx runs as the current user (`-p prefix -c conf -g 'daemon off;'`),
its pid, logs and temp files in a temporary folder. In front of it: a recorder standing in
for ComfyUI (it answers 200 to everything, so a 404 can only come from nginx, and it lists
every request that got through), and, in one test, the courier harness itself.
Skipped when nginx is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from comfy_courier.executor.settings import Settings
from comfy_courier.executor.storage.local import LocalStorage
from comfy_courier.nodes.save_and_callback import job_prefix

from conftest import API_KEY, model_free

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "comfy-courier.conf"
SERVER_NAME = "comfy.example.com"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


NGINX = find_nginx()
pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (Debian: apt-get install -y nginx); "
           "the reverse-proxy example is tested against a real nginx only")


# -- a stand-in for ComfyUI that records what reaches it --------------------------------


@dataclass
class Seen:
    method: str
    path: str  # the request target exactly as nginx sent it
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def start_recorder() -> tuple[Recorder, ThreadingHTTPServer]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.seen.append(Seen(self.command, self.path,
                                      {k.lower(): v for k, v in self.headers.items()}, body))
            answer = b'{"upstream": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = handle_any

        def do_HEAD(self) -> None:
            self.handle_any()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    recorder.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return recorder, server


# -- nginx --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    if shutil.which("openssl"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", f"/CN={SERVER_NAME}",
             "-addext", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True)
        return cert, key
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        pytest.skip("neither openssl nor the cryptography package is there to make a test "
                    "certificate")
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def rewrite(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{CONF.name} no longer has exactly one {old!r}"
    return text.replace(old, new)


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    cert: Path
    error_log: Path

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self.tls(), timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_nginx(folder: Path, upstream_port: int, conf: Path = CONF,
                upstreams: dict[str, str] | None = None) -> Nginx:
    """nginx running `conf`; its upstream `server` lines rewritten by `upstreams` (old line
    -> new), by default the one of comfy-courier.conf to `upstream_port`."""
    assert NGINX is not None
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(folder)
    port = free_port()
    site = conf.read_text()
    site = rewrite(site, "listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    for old, new in (upstreams or {"server 127.0.0.1:8188;":
                                   f"server 127.0.0.1:{upstream_port};"}).items():
        site = rewrite(site, old, new)
    site = rewrite(site, "/etc/nginx/tls/comfy.example.com/fullchain.pem", str(cert))
    site = rewrite(site, "/etc/nginx/tls/comfy.example.com/privkey.pem", str(key))
    (folder / "comfy-courier.conf").write_text(site)
    temp = {name: folder / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    # as root, nginx's workers would drop to `nobody`, who may not enter the pytest folder
    user = "user root;\n" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} notice;\n"
        "events { worker_connections 128; }\n"
        "http {\n"
        f"    access_log {folder / 'access.log'};\n"
        f"    client_body_temp_path {temp['body']};\n"
        f"    proxy_temp_path {temp['proxy']};\n"
        f"    fastcgi_temp_path {temp['fastcgi']};\n"
        f"    uwsgi_temp_path {temp['uwsgi']};\n"
        f"    scgi_temp_path {temp['scgi']};\n"
        f"    include {folder / 'comfy-courier.conf'};\n"
        "}\n")
    error_log = folder / "error.log"
    process = subprocess.Popen(
        [NGINX, "-p", str(folder), "-e", str(error_log), "-c", str(folder / "nginx.conf"),
         "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:  # wait until it listens (or died)
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            log = error_log.read_text() if error_log.exists() else ""
            raise AssertionError(f"nginx exited {process.returncode}: {stderr}{log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("nginx did not start listening within 10 s") from None
            time.sleep(0.01)
    return Nginx(process, port, cert, error_log)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, Recorder]]:
    recorder, server = start_recorder()
    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), recorder.port)
    yield nginx, recorder
    nginx.stop()
    server.shutdown()
    server.server_close()


@pytest.fixture
def through(proxy: tuple[Nginx, Recorder]) -> Iterator[tuple[httpx.Client, Recorder]]:
    nginx, recorder = proxy
    recorder.seen.clear()
    with nginx.client() as client:
        yield client, recorder


def raw_request(nginx: Nginx, target: bytes, method: bytes = b"GET") -> int:
    """One request with the target exactly as given (clients normalise `..` away)."""
    context = nginx.tls()
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
            tls.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: " + SERVER_NAME.encode()
                        + b"\r\nConnection: close\r\n\r\n")
            status_line = tls.makefile("rb").readline()
    return int(status_line.split()[1])


# -- what passes ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/execute-workflow", "/api/execute-workflow"])
def test_submit_passes_with_headers_and_body_intact(through, path):
    client, recorder = through
    body = b'{"content_request_id": "px-1", "workflow_json": {"1": {"class_type": "X"}}}'
    resp = client.post(path, content=body, headers={"X-API-Key": API_KEY,
                                                    "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.json() == {"upstream": True}
    [seen] = recorder.seen
    assert (seen.method, seen.path, seen.body) == ("POST", path, body)
    assert seen.headers["x-api-key"] == API_KEY
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == str(len(body))
    assert seen.headers["x-forwarded-proto"] == "https"
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("prefix", ["", "/api"])
def test_status_and_cancel_pass(through, method, prefix):
    client, recorder = through
    path = f"{prefix}/execute-workflow/job_1-{'x' * 100}"
    resp = client.request(method, path, headers={"X-API-Key": API_KEY})
    assert resp.status_code == 200
    assert [(s.method, s.path, s.headers["x-api-key"]) for s in recorder.seen] == [
        (method, path, API_KEY)]


@pytest.mark.parametrize("path", ["/courier/health", "/api/courier/health"])
def test_health_passes(through, path):
    client, recorder = through
    assert client.get(path).status_code == 200
    assert recorder.paths() == [path]


async def test_local_storage_urls_pass_and_nothing_else_of_view(through, tmp_path):
    client, recorder = through
    storage = LocalStorage(tmp_path, lambda: "https://comfy.example.com")
    urls = [await storage.put(f"{cid}/1-{n}.{ext}", b"x", "image/png")
            for n, (cid, ext) in enumerate([("job-png", "png"), ("job-webp", "webp"),
                                             ("Job-JPG", "jpg"), ("CON", "png"),
                                             ("nul", "jpg")], start=1)]
    urls.append(await storage.put("job-png/1_2-1.png", b"x", "image/png"))  # a takeover's run
    for prefix in ("social", "a/b/social"):  # the node's own files (nodes/ job_prefix)
        saved = tmp_path / job_prefix(prefix, "Job-JPG") / ".."
        node_file = saved.resolve() / f"{Path(prefix).name}_00001_.jpg"
        urls.append(storage.url_of_file(node_file))
    for url in urls:  # the URLs the courier hands out, exactly
        target = url.removeprefix("https://comfy.example.com")
        assert client.get(target).status_code == 200, target
    assert recorder.paths() == [u.removeprefix("https://comfy.example.com") for u in urls]
    recorder.seen.clear()
    refused = [
        "/view?filename=ComfyUI_00001_.png&subfolder=&type=output",  # the UI's outputs
        "/view?filename=1-1.png&subfolder=courier%2Fjob&type=input",
        "/view?filename=1-1.png&subfolder=courier%2Fjob&type=temp",
        "/view?filename=1-1.png&subfolder=courier%2F..%2F..&type=output",
        "/view?filename=1-1.png&subfolder=courier%2Fui%2Fsome-prompt&type=output",
        "/view?filename=1-1.png&subfolder=courier%2Fjob.&type=output",
        "/view?filename=1-1.png&subfolder=courier%2Fjob.zz&type=output",
        "/view?filename=1-1.png&subfolder=courier%2Fjob.1.2&type=output",
        "/view?filename=..%2F..%2Fuser%2Fcomfy.db&subfolder=courier%2Fjob&type=output",
        "/view?FILENAME=1-1.png&filename=x.png&subfolder=courier%2Fjob&type=output",
        "/view?filename=1-1.png&subfolder=courier%2Fjob&type=output&type=input",
        "/view?filename=1-1.png&subfolder=courier%2Fjob&type=output&channel=a",
        "/view?file%6Eame=1-1.png&subfolder=courier%2Fjob&type=output",
        "/view",
        "/api/view?filename=1-1.png&subfolder=courier%2Fjob&type=output",
    ]
    for target in refused:
        assert client.get(target).status_code == 404, target
    assert recorder.seen == []


# -- what does not ----------------------------------------------------------------------


COMFY_ROUTES = ["/", "/prompt", "/api/prompt", "/queue", "/api/queue", "/history",
                "/api/history", "/interrupt", "/api/interrupt", "/free", "/upload/image",
                "/upload/mask", "/api/upload/image", "/ws", "/api/ws", "/object_info",
                "/system_stats", "/extensions", "/userdata", "/api/userdata/comfy.settings.json",
                "/settings", "/users", "/embeddings", "/models", "/api/jobs", "/internal/logs",
                "/api/v2/userdata", "/manager/reboot", "/customnode/getlist",
                "/courier/metrics", "/courier/redeliver", "/execute-workflow/",
                "/execute-workflow/a/b", "/Execute-Workflow", "/execute-workflowx", "/index.html",
                "/scripts/app.js"]


@pytest.mark.parametrize("path", COMFY_ROUTES)
def test_comfyui_routes_are_404_from_nginx(through, path):
    client, recorder = through
    for method in ("GET", "POST"):
        resp = client.request(method, path, content=b"{}" if method == "POST" else None)
        assert resp.status_code == 404, (method, path)
    assert recorder.seen == []


def test_a_websocket_upgrade_is_404(through):
    client, recorder = through
    resp = client.get("/ws?clientId=x", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status_code == 404
    assert recorder.seen == []


@pytest.mark.parametrize("target", [
    b"/execute-workflow/../prompt",
    b"/execute-workflow/%2e%2e/prompt",
    b"/execute-workflow/..%2Fprompt",
    b"/api/execute-workflow/%2E%2E/%2E%2E/queue",
    b"//prompt",
    b"/api/../prompt",
    b"/execute-workflow;/../interrupt",
    b"/execute-workflow/abc/..%2F..%2Fhistory",
    b"/prompt;/execute-workflow",
    b"/execute-workflow/abc%00",
    b"/execute-workflow/..",
    b"http://127.0.0.1:8188/prompt",  # absolute-form target
])
def test_traversal_and_encoding_tricks_stay_out(proxy, target):
    nginx, recorder = proxy
    recorder.seen.clear()
    assert raw_request(nginx, target, b"POST") in (400, 404)
    assert recorder.seen == []


@pytest.mark.parametrize("method, path", [
    ("GET", "/execute-workflow"), ("PUT", "/execute-workflow"),
    ("POST", "/execute-workflow/abc"), ("PATCH", "/api/execute-workflow/abc"),
    ("POST", "/courier/health"), ("DELETE", "/view"),
])
def test_other_methods_on_courier_routes_are_refused(through, method, path):
    client, recorder = through
    assert client.request(method, path).status_code == 403
    assert recorder.seen == []


# -- the body limit ----------------------------------------------------------------------


def test_body_limit_matches_the_courier_default(through):
    client, recorder = through
    limit = Settings.from_env({}).max_body_bytes  # COURIER_MAX_BODY_MB default, in bytes
    [size] = re.findall(r"^\s*client_max_body_size\s+(\d+)m;", CONF.read_text(), re.M)
    assert int(size) * 1024 * 1024 == limit

    at_limit = b"x" * limit
    assert client.post("/execute-workflow", content=at_limit).status_code == 200
    assert len(recorder.seen) == 1 and len(recorder.seen[0].body) == limit
    recorder.seen.clear()

    assert client.post("/execute-workflow", content=at_limit + b"x").status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: nginx counts as it reads
        for _ in range(11):
            yield b"x" * (1024 * 1024)

    assert client.post("/execute-workflow", content=chunks()).status_code == 413
    assert recorder.seen == []


# -- end to end: nginx in front of the courier harness -----------------------------------


async def test_a_job_through_nginx_end_to_end(make_harness, tmp_path):
    import asyncio

    h = await make_harness()
    nginx = await asyncio.to_thread(start_nginx, tmp_path / "nginx", h.client.port)
    try:
        async with httpx.AsyncClient(base_url=nginx.base_url, verify=nginx.tls(),
                                     timeout=10) as client:
            job = {"content_request_id": "via-nginx-1", "workflow_json": model_free()}
            resp = await client.post("/execute-workflow", json=job,
                                     headers={"X-API-Key": API_KEY})
            assert resp.status_code == 202, resp.text
            assert (await client.post("/api/execute-workflow", json=job)).status_code == 401
            [callback] = await h.receiver.wait_for(1)
            assert callback.json["status"] == "success"
            status = await client.get("/api/execute-workflow/via-nginx-1",
                                      headers={"X-API-Key": API_KEY})
            assert status.status_code == 200 and status.json()["state"] == "success"
            gone = await client.delete("/execute-workflow/no-such-job",
                                       headers={"X-API-Key": API_KEY})
            assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
            health = await client.get("/courier/health")
            assert health.status_code == 200 and health.json()["ok"] is True
            for path in ("/prompt", "/queue", "/history"):
                assert (await client.get(path)).status_code == 404
    finally:
        await asyncio.to_thread(nginx.stop)
