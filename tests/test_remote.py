"""Object-store and list-file inputs against a real S3 API server (moto_server on 127.0.0.1, started here)."""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3  # the dev extra: s3fs, moto[server], boto3
import pyarrow as pa
import pyarrow.csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, make_corpus, run_pipeline

SECRET = "not-a-real-secret-9f3b"  # must appear in no output file and no log line
KEY_ID = "AKIAKEYIDOFTHETEST000"  # nor this (debug logging included)
COMMON = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--workers", "1"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on a free localhost port for the session, and the environment that points at it."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"] + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # for this process's boto3 and fsspec too
    yield env
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    server.terminate()
    server.wait(10)


def _bucket(env, name: str, folder: Path, prefix: str) -> "boto3.client":
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=name)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), name, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return client


def _rows(out: Path) -> dict:
    return ds.dataset(str(out), format="parquet").to_table().sort_by("path").to_pydict()


def _no_secret(out: Path, *logs: str) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes() and KEY_ID.encode() not in path.read_bytes(), path
    assert all(SECRET not in log and KEY_ID not in log for log in logs)


def test_a_bucket_prefix_is_classified_like_the_same_folder(tmp_path, s3_env):
    paths = make_corpus(tmp_path / "in", 9)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    _bucket(s3_env, "prefix-test", tmp_path / "in", "nightly/photos")
    remote = run_pipeline("classify", "s3://prefix-test/nightly/photos/", str(tmp_path / "out"), *COMMON, "-v",
                          env={**s3_env, "AWS_ACCESS_KEY_ID": KEY_ID})
    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "local"), *COMMON)

    rows, local = _rows(tmp_path / "out"), _rows(tmp_path / "local")
    assert rows["path"] == paths and set(rows["status"]) == {"ok"}
    assert rows["label"] == local["label"] and rows["logits"] == local["logits"]
    _no_secret(tmp_path / "out", remote.stderr)
    verify = run_pipeline("verify", str(tmp_path / "out"), check=False)
    assert verify.returncode == 0, verify.stdout


def test_a_list_file_mixes_local_paths_and_urls(tmp_path, s3_env):
    paths = make_corpus(tmp_path / "in", 4)
    _bucket(s3_env, "list-test", tmp_path / "in", "p")
    items = [f"s3://list-test/p/{paths[0]}", f"s3://list-test/p/{paths[1]}", f"in/{paths[2]}",
             str(tmp_path / "in" / paths[3]), f"s3://list-test/p/{paths[0]}",  # a duplicate: one row
             "s3://list-test/p/missing.jpg", "in/missing.png"]
    (tmp_path / "items.txt").write_text("\n".join(items) + "\n\n")
    run_pipeline("classify", "--input-list", str(tmp_path / "items.txt"), str(tmp_path / "out"), *COMMON,
                 "--max-error-rate", "0.5", env=s3_env)

    rows = _rows(tmp_path / "out")
    assert rows["path"] == sorted(set(items))
    by_path = dict(zip(rows["path"], zip(rows["status"], rows["error"], strict=True), strict=True))
    assert by_path["s3://list-test/p/missing.jpg"][1].startswith("file vanished")
    assert by_path["in/missing.png"][1].startswith("file vanished")
    assert sum(status == "ok" for status, _ in by_path.values()) == 4


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_warehouse_export_names_the_items_in_its_path_column(tmp_path, kind):
    from pipeline.remote import ListFile

    table = pa.table({"id": [3, 1, 2], "path": ["s3://b/k/2.jpg", "/data/1.jpg", "s3://b/k/2.jpg"]})
    file = tmp_path / f"items.{kind}"
    pq.write_table(table, file) if kind == "parquet" else pyarrow.csv.write_csv(table, file)
    assert ListFile(file).read() == ["/data/1.jpg", "s3://b/k/2.jpg"]


def test_an_object_deleted_after_listing_and_a_kill_minus_9_resume(tmp_path, s3_env):
    make_corpus(tmp_path / "in", 40, size=(64, 48))
    client = _bucket(s3_env, "kill-test", tmp_path / "in", "p")
    args = ["classify", "s3://kill-test/p", str(tmp_path / "out"), *COMMON, "--shard-size", "4",
            "--max-error-rate", "0.5"]
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stderr=subprocess.DEVNULL,
                               env={**os.environ, **s3_env, "PYTHONPATH": str(REPO)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the job and its workers, as a node failure would
    process.wait()
    assert 2 <= len(list(out.glob("part-*.parquet"))) < 10 and not (out / "_SUCCESS").exists()

    last = sorted(_keys(client, "kill-test"))[-1]  # in the last shard: not yet read
    client.delete_object(Bucket="kill-test", Key=last)
    run_pipeline(*args, env=s3_env)

    rows = _rows(out)
    assert len(rows["path"]) == len(set(rows["path"])) == 40
    failed = {path: error for path, error in zip(rows["path"], rows["error"], strict=True) if error}
    assert list(failed) == [last.removeprefix("p/")] and failed[last.removeprefix("p/")].startswith("file vanished")


def test_two_ranks_share_a_bucket_prefix_in_a_partition(tmp_path, s3_env):
    paths = make_corpus(tmp_path / "in", 10, size=(64, 48))
    _bucket(s3_env, "ranks-test", tmp_path / "in", "p")
    args = ["classify", "s3://ranks-test/p/", str(tmp_path / "out"), *COMMON, "--shard-size", "3", "--world-size",
            "2", "--partition", "run_date=2024-05-01"]
    for rank in ("0", "1"):
        run_pipeline(*args, "--rank", rank, env=s3_env)
    run_pipeline("finalize", str(tmp_path / "out"), "--partition", "run_date=2024-05-01")

    run = tmp_path / "out" / "run_date=2024-05-01"
    assert (run / "_SUCCESS").exists() and _rows(run)["path"] == paths
    assert run_pipeline("verify", str(run), check=False).returncode == 0


def _keys(client, bucket: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]


def test_wrong_credentials_exit_2_before_anything_is_written(tmp_path, s3_env):
    make_corpus(tmp_path / "in", 2)
    _bucket(s3_env, "auth-test", tmp_path / "in", "p")
    reset = s3_env["AWS_ENDPOINT_URL"] + "/moto-api/reset-auth"
    _post(reset, b"0")  # moto checks the keys from now on
    try:
        result = run_pipeline("classify", "s3://auth-test/p/", str(tmp_path / "out"), *COMMON, check=False,
                              env={**s3_env, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"})
    finally:
        _post(reset, b"inf")
    assert result.returncode == 2, result.stderr
    assert "access denied" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert not (tmp_path / "out").exists()
    _no_secret(tmp_path, result.stderr)


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that throttles every request, as S3 does past a prefix's request rate."""

    requests = 0
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def do_GET(self):
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_throttled_object_is_retried_then_an_error_row(monkeypatch):
    import fsspec

    from pipeline import remote
    from pipeline.causes import Unusable

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: s3fs's and ours remain
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        with pytest.raises(Unusable) as raised:
            remote.ObjectStore("s3://throttled/p", fetch_threads=1).open("a.jpg")
    finally:
        server.shutdown()
        fsspec.filesystem("s3").clear_instance_cache()
    assert raised.value.cause == "unreadable file" and f"after {remote.ATTEMPTS} tries" in str(raised.value)
    assert _SlowDown.requests >= remote.ATTEMPTS
    assert SECRET not in str(raised.value)


class _DenyOne(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the moto server that answers 403 AccessDenied to GETs of one key, as a bucket policy
    denying that object would; every other request goes through unchanged."""

    upstream = ""
    denied = ""
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        if self.command == "GET" and self.path.split("?")[0].endswith(self.denied):
            return self._answer(403, [("Content-Type", "application/xml")], self.body)
        length = int(self.headers.get("Content-Length") or 0)
        request = urllib.request.Request(self.upstream + self.path, data=self.rfile.read(length) if length else None,
                                         method=self.command, headers=dict(self.headers.items()))
        try:
            with urllib.request.urlopen(request) as response:
                self._answer(response.status, response.getheaders(), response.read())
        except urllib.error.HTTPError as error:
            self._answer(error.code, error.headers.items(), error.read())

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args):
        pass


def test_an_object_denied_to_these_credentials_is_an_error_row_and_the_others_are_classified(tmp_path, s3_env):
    paths = make_corpus(tmp_path / "in", 4)
    _bucket(s3_env, "deny-test", tmp_path / "in", "p")
    _DenyOne.upstream, _DenyOne.denied = s3_env["AWS_ENDPOINT_URL"], f"/p/{paths[2]}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DenyOne)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_pipeline("classify", "s3://deny-test/p/", str(tmp_path / "out"), *COMMON, "--max-error-rate", "0.5",
                     env={**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()

    rows = _rows(tmp_path / "out")
    assert rows["path"] == paths
    errors = dict(zip(rows["path"], rows["error"], strict=True))
    assert errors.pop(paths[2]).startswith("unreadable file: access denied")
    assert set(errors.values()) == {None}


def _post(url: str, data: bytes) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST",
                                                  headers={"Content-Type": "text/plain"}))


def test_an_object_store_output_and_a_missing_extra_are_refused(tmp_path, s3_env):
    output = run_pipeline("classify", str(tmp_path), "s3://bucket/out/", *COMMON, check=False)
    assert output.returncode == 2 and "OUTPUT must be a POSIX filesystem path" in output.stderr
    secret = run_pipeline("classify", f"az://container/photos/?sig={SECRET}", str(tmp_path / "out"), *COMMON,
                          check=False)
    assert secret.returncode == 2 and "the URL holds credentials" in secret.stderr and SECRET not in secret.stderr
    if _installed("gcsfs"):
        pytest.skip("gcsfs is installed")
    missing = run_pipeline("classify", "gs://bucket/photos/", str(tmp_path / "out"), *COMMON, check=False)
    assert missing.returncode == 2 and "pip install -e '.[gcs]'" in missing.stderr


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_a_second_night_with_incremental_reads_only_new_and_changed_objects(tmp_path, s3_env):
    paths = make_corpus(tmp_path / "in", 5)
    client = _bucket(s3_env, "nights-test", tmp_path / "in", "landing")
    url, out = "s3://nights-test/landing/", tmp_path / "out"
    night = [*COMMON, "--incremental", "--partition"]
    run_pipeline("classify", url, str(out), *night, "run_date=d1", env=s3_env)
    client.upload_file(str(tmp_path / "in" / paths[0]), "nights-test", "landing/new/added.jpg")
    client.put_object(Bucket="nights-test", Key=f"landing/{paths[1]}",
                      Body=(tmp_path / "in" / paths[2]).read_bytes())  # other bytes: another size
    client.delete_object(Bucket="nights-test", Key=f"landing/{paths[3]}")

    second = run_pipeline("classify", url, str(out), *night, "run_date=d2", env=s3_env)

    rows = _rows(out / "run_date=d2")
    assert dict(zip(rows["path"], rows["status"], strict=True)) == {"new/added.jpg": "ok", paths[1]: "ok",
                                                                    paths[3]: "deleted"}
    head = client.head_object(Bucket="nights-test", Key=f"landing/{paths[1]}")
    at = rows["path"].index(paths[1])
    assert rows["file_size"][at] == head["ContentLength"]
    assert rows["file_mtime"][at].replace(microsecond=0) == head["LastModified"].replace(microsecond=0)
    assert "2 files new or changed, 1 deleted, 3 unchanged" in second.stderr
