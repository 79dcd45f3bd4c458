"""The command lines a user meets first: every script's --help opens with a one-line description of what it does, and
`python3 -m data.synthetic --export` runs without a RuntimeWarning."""
import os
import subprocess
import sys

import pytest

import evaluateSSL
import predict
import trainSSL
import trainSSL_domain_adaptation_targetCity
import trainSSL_less_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "trainSSL.py": (trainSSL.main, "Train a segmentation network semi-supervised, with pixel-level contrastive "
                                   "learning from a class-wise memory bank."),
    "trainSSL_less_memory.py": (trainSSL_less_memory.main, "Train with trainSSL.py's method in alternating labeled "
                                                           "and unlabeled steps, so that a run fits a smaller GPU."),
    "trainSSL_domain_adaptation_targetCity.py": (trainSSL_domain_adaptation_targetCity.main,
                                                 "Train semi-supervised domain adaptation from GTA5 to Cityscapes "
                                                 "with trainSSL.py's method."),
    "evaluateSSL.py": (evaluateSSL.main, "Evaluate a trained checkpoint on its dataset's validation split: "
                                         "per-class IoU and mIoU."),
    "predict.py": (predict.main, "Segment your own images with a trained checkpoint: colour-coded masks, class-id "
                                 "maps and overlays."),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_opens_with_a_one_line_description(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping: the description is one line
    main, description = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    assert exit_status.value.code == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert blocks[0].startswith("usage: ") and blocks[1] == description


def test_synthetic_export_runs_without_warnings(tmp_path):
    out = tmp_path / "scenes"
    result = subprocess.run([sys.executable, "-W", "error", "-m", "data.synthetic", "--export", str(out),
                             "--num-train", "1", "--num-val", "1", "--image-size", "8,12"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert sorted(os.listdir(out / "val" / "images")) == ["synthetic_1_00000.png"]
