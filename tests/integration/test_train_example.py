"""scripts/examples/train_ddp.py: the same losses and weights under torchrun and flashrun, and exact resumption."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from tests.helpers import BIN, REPO, Launcher

SCRIPT = str(REPO / "scripts" / "examples" / "train_ddp.py")
STEP_LINE = re.compile(r"step (\d+) loss (\S+)$")


def train(launcher: Launcher, program: str, *args: str) -> dict[int, str]:
    """Run the example on two workers; return {step: loss text} from rank 0's lines."""
    launch = launcher.start([str(BIN / program), "--standalone", "--nproc-per-node", "2", SCRIPT, *args],
                            name=program)
    code = launch.wait(90)
    assert code == 0, f"{program} exited with {code}; output:\n{launch.output[-4000:]}"
    return {int(m.group(1)): m.group(2) for line in launch.output.splitlines() if (m := STEP_LINE.search(line))}


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # numpy is optional here
        import torch

    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{path_a.name} and {path_b.name} differ in {different}"


def test_same_run_under_both_launchers_and_after_resume(launcher: Launcher, tmp_path: Path) -> None:
    reference = train(launcher, "torchrun", "--steps", "8", "--seed", "3", "--out", str(tmp_path / "torchrun.pt"))
    assert sorted(reference) == list(range(8))

    # flashrun stops after step 3 with the last checkpoint after step 2, then a second run redoes step 3 onwards:
    # every loss and the final weights must be torchrun's uninterrupted run's.
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3"]
    first = train(launcher, "flashrun", "--steps", "4", "--seed", "3", *checkpoints)
    assert first == {step: reference[step] for step in range(4)}
    resumed = train(launcher, "flashrun", "--steps", "8", "--seed", "3", *checkpoints,
                    "--out", str(tmp_path / "resumed.pt"))
    assert resumed == {step: reference[step] for step in range(3, 8)}
    assert_same_weights(tmp_path / "torchrun.pt", tmp_path / "resumed.pt")
    assert launcher.survivors() == []
