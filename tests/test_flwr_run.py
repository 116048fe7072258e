"""The README's main command, for real: `flwr run .` with the smoke preset, as a subprocess.

Isolated FLWR_HOME and port; the run's status is checked with `flwr ls` (flwr run exits 0 even
when a run fails); afterwards no SuperLink or SuperExec of this test may be left running."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ccmr_core.flwr_env import child_env

from tests.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]


def _flwr():
    return str(Path(sys.executable).with_name("flwr"))


def _ours(flwr_home: Path) -> list[str]:
    """This test's SuperLink/SuperExec: their command lines name the test's own FLWR_HOME (state
    database, log file); a port could be another run's."""
    out = subprocess.run(["pgrep", "-af", "flower-superlink|flower-superexec"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(flwr_home) in line]


@pytest.mark.timeout(420)
def test_flwr_run_smoke_completes_and_leaves_nothing_running(cohort, tmp_path):
    if not Path(_flwr()).exists():
        pytest.skip("flwr CLI not installed next to this interpreter")
    ray_dir = tempfile.mkdtemp(prefix="ccmr-ray-", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    env = child_env(clean=True, FLWR_HOME=str(tmp_path / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                    CCMR_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path), RAY_TMPDIR=ray_dir)
    out_dir = tmp_path / "run"
    cmd = [_flwr(), "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config",
           f"preset='smoke' out-dir='{out_dir}' data-dir='{cohort}'"]  # the suite's cohort: none generated
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
        # the log stream may end early (flwr run exits 0 regardless): the run folder is the evidence
        deadline = time.time() + 300
        while not (out_dir / "metrics.json").is_file() and time.time() < deadline:
            time.sleep(2)
        sl_log = tmp_path / "flwr" / "local-superlink" / "superlink.log"
        log = r.stdout + r.stderr + (sl_log.read_text()[-3000:] if sl_log.is_file() else "")
        assert r.returncode == 0, log[-4000:]
        assert (out_dir / "metrics.json").is_file() and (out_dir / "model.pt").is_file(), log[-4000:]
        ls = subprocess.run([_flwr(), "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
        runs = json.loads(ls.stdout)["runs"]
        assert runs and runs[-1]["status"] == "finished:completed", ls.stdout
        assert json.loads((out_dir / "metrics.json").read_text())["test"]["n"] > 0
        assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2  # the smoke preset's rounds
        assert json.loads((out_dir / "metrics.json").read_text())["supernodes"] == 3  # one per site
        deadline = time.time() + 60
        while _ours(tmp_path) and time.time() < deadline:
            time.sleep(1)
        assert _ours(tmp_path) == [], "flwr left its local SuperLink running"
    finally:
        for line in _ours(tmp_path):  # end only what this test started, by PID
            subprocess.run(["kill", line.split()[0]], check=False)
        shutil.rmtree(ray_dir, ignore_errors=True)
