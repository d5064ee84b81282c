"""benchmarks/run_queue.sh: a cut-off run resumes with the overrides it was started with (EXTRA), and
a finished run is skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_bench import BASE

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("taskset") is None,
                                reason="run_queue.sh needs bash and taskset (util-linux)")


def _queue(config: Path, run: Path, extra: str) -> None:
    env = dict(os.environ, EXTRA=extra, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(REPO / "benchmarks" / "run_queue.sh"), "0", f"{config}={run}"], env=env,
                   check=True, timeout=300)


def test_a_cut_off_run_resumes_with_its_overrides_and_a_finished_one_is_skipped(tmp_path):
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(BASE))
    run = tmp_path / "runs" / "ce"
    extra = "train.lr=0.07 train.num_threads=1"  # lr differs from the config file's: resume must get it too
    _queue(config, run, extra)
    assert (run / "eval.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.07
    (run / "eval.json").unlink()  # as if the queue had been cut off before the evaluation
    _queue(config, run, extra)
    log = Path(f"{run}.log").read_text().splitlines()
    assert [line.split()[:2] for line in log if line.startswith("exit ")] == [["exit", "0"], ["exit", "0"]]
    assert (run / "eval.json").is_file()
    _queue(config, run, extra)  # finished: skipped, no third process
    assert sum(line.startswith("exit ") for line in Path(f"{run}.log").read_text().splitlines()) == 2
