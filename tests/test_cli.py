"""The CLI's process entry (cli.run) ends a finished command at once, skipping Python's teardown, with
the command's exit code and a flushed log; anything else still ends the normal way. Real processes."""

import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, make_corpus


@pytest.fixture
def python(tmp_path):
    """Runs Python with an exit handler installed at start-up (a sitecustomize module) that prints only if
    Python's teardown runs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: print('teardown ran', file=sys.stderr, flush=True))\n")

    def run(*args: str) -> subprocess.CompletedProcess:
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin"},
                                   start_new_session=True)  # its own process group: its decode workers too
        stdout, stderr = process.communicate(timeout=300)
        try:
            os.killpg(process.pid, 0)
            left = True
        except ProcessLookupError:
            left = False
        assert not left, f"processes of {args} outlived it (decode workers not joined?)"
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return run


def test_a_finished_run_skips_the_teardown_with_its_log_whole(tmp_path, python):
    make_corpus(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    classify = ["-m", "pipeline", "classify", str(tmp_path / "in")]
    options = ["--weights", "random", "--device", "cpu", "--workers", "2"]

    ok = python(*classify, str(tmp_path / "ok"), *options, "--max-error-rate", "0.5")
    too_many = python(*classify, str(tmp_path / "strict"), *options, "--max-error-rate", "0.1")
    report = python("-m", "pipeline", "verify", str(tmp_path / "ok"))

    assert ok.returncode == 0, ok.stderr
    assert "teardown ran" not in ok.stderr
    last_line = ok.stderr.rstrip().splitlines()[-1]
    command = f"{shlex.quote(sys.executable)} -m pipeline errors {shlex.quote(str(tmp_path / 'ok'))}"
    assert last_line.endswith(f"every failed file: {command}"), ok.stderr
    assert too_many.returncode == 3 and "teardown ran" not in too_many.stderr
    assert "more than --max-error-rate 0.1 allows" in too_many.stderr.rstrip().splitlines()[-1]
    assert (tmp_path / "strict" / "_SUCCESS").exists(), "every row committed before the exit"
    assert report.returncode == 0 and "teardown ran" not in report.stderr
    assert report.stdout.rstrip().splitlines()[-1].startswith("verify: ok"), report.stdout


def test_a_message_an_error_a_running_thread_or_a_worker_process_end_the_normal_way(python):
    prelude = "import sys, threading, time\nimport pipeline.cli as cli\n"
    message = python("-c", prelude + "cli.main = lambda: sys.exit('cannot go on: a message')\ncli.run()")
    error = python("-c", prelude + "def fail(): raise RuntimeError('unexpected')\ncli.main = fail\ncli.run()")
    thread = python("-c", prelude + "def work():\n    time.sleep(0.3)\n    print('thread finished', file=sys.stderr)\n"
                    "def command():\n    threading.Thread(target=work).start()\n    sys.exit(0)\n"
                    "cli.main = command\ncli.run()")
    worker = python("-c", prelude + "import multiprocessing\n"
                    "def command():\n    multiprocessing.Process(target=time.sleep, args=(0.3,)).start()\n"
                    "    sys.exit(0)\n"
                    "cli.main = command\ncli.run()")

    assert message.returncode == 1 and "cannot go on: a message" in message.stderr
    assert error.returncode == 1 and "RuntimeError: unexpected" in error.stderr
    assert thread.returncode == 0 and "thread finished" in thread.stderr
    assert worker.returncode == 0
    for ended in (message, error, thread, worker):
        assert "teardown ran" in ended.stderr
