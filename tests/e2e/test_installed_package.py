"""An installed Mailroom runs: a wheel in a fresh virtual environment, far from the checkout.

Built with `pip wheel --no-deps` from a copy of the source files, installed with
its dependencies into a new venv (no access to the checkout or to this venv's
packages), then `mailroom init`, `user add`, `run`, one message delivered over
the public listener to a Maildir, and supervisord stopped.  Whatever the
commands read at run time must therefore be package data.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.suite import DOVECOT_PORTS, LISTENERS, free_port, maildir_messages, wait_port

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAILROOM_CONFIG", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HOME"] = os.environ.get("HOME", str(home))
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _source_copy(dest: Path) -> Path:
    """The files git knows (committed or not, never ignored ones): what a fresh clone would build."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the Mailroom user can reach (pytest's own are 0700): run as root, the
    installed daemons switch to that user and must read the venv and the installation."""
    path = Path(tempfile.mkdtemp(prefix="mailroom-wheel-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_wheel_installed_in_a_fresh_venv_inits_runs_and_delivers(workdir: Path) -> None:
    env = _clean_env(workdir)
    source = _source_copy(workdir / "source")
    wheels = workdir / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)], workdir, env)
    wheel = next(wheels.glob("mailroom-*.whl"))

    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], workdir, env)
    bin_ = venv / "bin"
    _run([str(bin_ / "pip"), "install", "--quiet", str(wheel)], workdir, env)
    shutil.rmtree(source)  # nothing may be read from the source files any more

    where = _run([str(bin_ / "python"), "-c", "import cli, common, mta; print(cli.__file__, common.__file__)"],
                 workdir, env).stdout
    assert all(p.startswith(str(venv)) for p in where.split()), where

    site = workdir / "site"
    mailroom = str(bin_ / "mailroom")
    _run([mailroom, "init", "--dir", str(site), "--domain", "example.org", "--hostname", "mail.test"], workdir, env)
    conf = site / "mailroom.toml"
    text = conf.read_text()
    ports = {}
    for (_, key), default in LISTENERS.items():
        ports[key] = free_port()
        text = text.replace(f'{key} = "{default}"', f'{key} = "127.0.0.1:{ports[key]}"')
    conf.write_text(text)
    # The password piped in, as the README shows it for alice: no --password-stdin needed without a terminal.
    _run([mailroom, "--config", str(conf), "user", "add", "alice@example.org"], workdir, env,
         stdin="pw-of-the-first-user\n")
    mailbox = site / "mail" / "example.org" / "alice"

    log = open(workdir / "run.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([mailroom, "--config", str(conf), "run"], cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            for key, port in ports.items():
                if key not in DOVECOT_PORTS:  # Dovecot runs only where it can (cli/dovecot.py)
                    wait_port(port, timeout=60)
        except TimeoutError:
            raise AssertionError("mailroom run did not start:\n" + (workdir / "run.log").read_text()[-4000:]) \
                from None
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
            client.ehlo("client.test")
            refused = client.sendmail(
                "someone@remote.test", ["alice@example.org"],
                b"From: someone@remote.test\r\nTo: alice@example.org\r\nSubject: installed\r\n\r\nit runs\r\n",
            )
            assert refused == {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not maildir_messages(mailbox):
            time.sleep(0.1)
        delivered = maildir_messages(mailbox)
        assert len(delivered) == 1, (workdir / "run.log").read_text()[-4000:]
        assert b"it runs" in delivered[0].read_bytes()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
    assert proc.returncode == 0, (workdir / "run.log").read_text()[-4000:]
