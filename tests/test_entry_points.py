"""What every script starts and ends with (engine/cli.py, engine/entry.py, engine/rng.py): the flags and their help
(held to docs/configuration.md's tables), the choice of the device, the top-level exit codes and messages, and the RNG
states a run state holds."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

import trainSSL
from engine.run import Run
from tests.run_helpers import argv_of, tiny_sets
from utils.variants import TRAIN_SSL


def test_main_guard_exit_codes_and_messages(capsys, monkeypatch):
    """The scripts' top level: success returns (and tears the process group down); a user error prints
    "<label>: <message>" alone and exits with its code (2, or a stop's own: 128 + 15 after SIGTERM); any other
    exception propagates with its traceback, and nothing is torn down after a failure."""
    from engine import entry as training
    from utils.errors import RunStopped, UserError
    cleaned = []
    monkeypatch.setattr(training.dist, "cleanup", lambda: cleaned.append(True))
    ran = []
    assert training.main_guard(lambda: ran.append(1)) is None
    assert ran == [1] and cleaned == [True]

    def fails(error):
        def main():
            raise error
        return main

    for error, code, line in [(UserError("c.json: unknown key 'x'"), 2, "error: c.json: unknown key 'x'"),
                              (RunStopped("stopped by SIGTERM", exit_code=143, label="stopped"), 143,
                               "stopped: stopped by SIGTERM")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            training.main_guard(fails(error))
        assert e.value.code == code and capsys.readouterr().err == line + "\n"
    with pytest.raises(RuntimeError, match="a bug"):
        training.main_guard(fails(RuntimeError("a bug")))
    assert cleaned == [True]


def test_command_line_help_argv_and_flag_pairs(tmp_path, capsys, monkeypatch):
    """--help names the script by its docstring's first line; the run keeps its own argv (for the resume command a
    stop prints), sys.argv's when none is given; --check-files without --dry-run and --recover without --resume are
    refused by the parser (exit 2), and accepted with their partner."""
    with pytest.raises(SystemExit) as e:
        trainSSL.main(["--help"])
    assert e.value.code == 0 and trainSSL.__doc__.splitlines()[0] in capsys.readouterr().out.replace("\n", " ")
    with pytest.raises(SystemExit):
        Run(TRAIN_SSL, ["--help"])  # no description given: the script's name
    assert "\ntrainSSL\n" in capsys.readouterr().out
    argv = argv_of(tiny_sets(str(tmp_path / "run"), 3)) + ["--dry-run"]
    assert Run(TRAIN_SSL, argv).argv == argv
    monkeypatch.setattr("sys.argv", ["trainSSL.py"] + argv)
    assert Run(TRAIN_SSL, None).argv == argv
    for extra in (["--check-files"], ["--recover"], ["--recover", "--check-files", "--dry-run"]):
        with pytest.raises(SystemExit) as e:
            Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 3)) + extra)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            ": error: --check-files goes with --dry-run, --recover with --resume")
    Run(TRAIN_SSL, argv + ["--check-files"])  # with its partner: accepted (and every file read)
    assert "dry run: OK" in capsys.readouterr().out
    from utils.errors import UserError
    with pytest.raises(UserError, match="missing.pth"):  # past the parser: the checkpoint is looked for
        Run(TRAIN_SSL, argv + ["--recover", "--resume", str(tmp_path / "missing.pth")])


def flag_table(heading: str) -> dict[str, str]:
    """The `| flag | meaning |` table under `## heading` of docs/configuration.md: {flag cell: meaning, backticks
    and escapes removed}."""
    import re
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "configuration.md")).read()
    text = text[text.index(f"\n## {heading}\n"):]
    table = text[text.index("| flag | meaning |"):]
    table = table[:table.index("\n\n")].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 2, line
        rows[cells[0].strip("`")] = cells[1].replace("`", "")
    return rows


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{"-c, --config FILE": help} for every flag but --help, as the docs' tables write them."""
    flags = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        value = "" if action.nargs == 0 else f" [{action.metavar}]" if action.nargs == "?" else f" {action.metavar}"
        flags[", ".join(action.option_strings) + value] = action.help
    return flags


def test_flags_and_their_help_are_the_docs_tables():
    """docs/configuration.md's flag tables and --help say the same, for the training scripts (the domain-adaptation
    script's parser, the only one with --gta5-root), evaluateSSL.py and predict.py: each row's flag, short form and
    argument name is a flag of the parser, its meaning is that flag's help text (backticks aside), and no flag is
    missing from either; and the defaults."""
    import evaluateSSL
    import predict
    from engine.cli import build_arg_parser
    rows = flag_table("Training scripts")
    assert parser_flags(build_arg_parser("x", gta5=True)) == rows and len(rows) == 10
    rows.pop("--gta5-root PATH")
    assert parser_flags(build_arg_parser("x")) == rows
    assert parser_flags(evaluateSSL.build_parser()) == flag_table("evaluateSSL.py")
    assert parser_flags(predict.build_parser()) == flag_table("predict.py")
    # what a flag left out means: no file or folder given, no override, the device chosen for you, switches off
    parser = build_arg_parser("x", gta5=True, config_required=False)
    assert vars(parser.parse_args([])) == {
        "config": None, "data_root": None, "gta5_root": None, "overrides": [], "device": "auto", "dry_run": False,
        "check_files": False, "resume": None, "restart": False, "recover": False}
    assert parser.parse_args(["--set", "a=1", "--set", "b=2"]).overrides == ["a=1", "b=2"]
    assert vars(evaluateSSL.parse_args(["-m", "x.pth"])) == {
        "model_path": "x.pth", "data_root": None, "device": "auto", "gpu": None, "overrides": [],
        "save_output_images": None, "protocol": "whole"}


def test_choose_device(monkeypatch):
    """auto: CUDA when there is one, else the CPU; a CUDA device asked for without CUDA stops with the fix; under
    torchrun every process takes cuda:<LOCAL_RANK>, and the chosen CUDA device is made current."""
    from engine import distributed
    from utils.errors import UserError
    from engine.cli import choose_device
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu") == choose_device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=r"^--device cuda was asked for but no CUDA device is available; use "
                                            r"--device cpu\.$"):
            choose_device(name)
    assert current == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda") and choose_device("cuda:1") == torch.device("cuda:1")
    assert choose_device("cpu") == torch.device("cpu")
    assert current == [torch.device("cuda"), torch.device("cuda:1")]
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "local_rank", lambda: 3)
    assert choose_device("cuda") == torch.device("cuda:3") == choose_device("auto") == current[-1]


def test_seed_everything_and_rng_state_round_trip(tmp_path):
    """seed_everything seeds Python, NumPy and torch alike; rng_state survives a weights_only checkpoint and
    set_rng_state puts every generator back, including NumPy's cached Gaussian."""
    import random

    from engine.checkpoint import load_checkpoint, save_atomic
    from engine.rng import rng_state, seed_everything, set_rng_state

    def draws():
        return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2).tolist()

    seed_everything(7)
    seeded = draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert seeded == draws()
    np.random.randn()                                   # an odd number of Gaussians: one is cached
    save_atomic({"rng": rng_state()}, str(tmp_path / "s.pth"))
    expected = draws()
    seed_everything(123)
    set_rng_state(load_checkpoint(str(tmp_path / "s.pth"))["rng"])
    assert draws() == expected


def test_release_short_flags_required_config_and_gta5_root_where_it_belongs(tmp_path, capsys):
    """The release's -c/-r: --config is required (shown as such by --help, refused with argparse's message when
    missing), unless -r names a checkpoint, whose stored config is then used (dry run); `-r auto` needs the config
    to find the run directory. --gta5-root is a flag of the domain-adaptation script only. A stop's resume command
    drops an earlier -r as it drops --resume."""
    import trainSSL_domain_adaptation_targetCity as da
    from engine.config import load_config
    from engine.graceful_stop import resume_command
    from tests.run_helpers import DEMO
    with pytest.raises(SystemExit):
        trainSSL.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert " -c FILE " in usage and "[-c FILE]" not in usage and "--gta5-root" not in usage
    for argv in (["--dry-run"], ["-r", "auto", "--dry-run"], ["--resume", "auto"]):
        with pytest.raises(SystemExit) as e:
            trainSSL.main(argv)
        assert e.value.code == 2 and "the following arguments are required: -c/--config" in capsys.readouterr().err
    sets = tiny_sets(str(tmp_path / "run"), 3)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"config": load_config(DEMO, [f"{k}={v}" if isinstance(v, str) else f"{k}={__import__('json').dumps(v)}"
                                             for k, v in sets.items()])}, path)
    run = Run(TRAIN_SSL, ["-r", path, "--dry-run", "--device", "cpu"])
    assert run.args.resume == path and run.args.config is None and run.cfg_source == path
    assert "dry run: OK" in capsys.readouterr().out
    run = Run(TRAIN_SSL, ["-c", DEMO, "-r", "auto", "--dry-run", "--device", "cpu"] + argv_of(sets)[4:])
    assert run.args.config == DEMO and run.args.resume == "auto"
    with pytest.raises(SystemExit) as e:
        trainSSL.main(argv_of(sets) + ["--gta5-root", "x", "--dry-run"])
    assert e.value.code == 2 and "unrecognized arguments: --gta5-root x" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        da.main(["--help"])
    assert "--gta5-root PATH" in capsys.readouterr().out
    run.argv = ["-c", "c.json", "-r", "old.pth", "--set", "utils.log_every=5"]
    assert resume_command(run) == "python3 trainSSL.py -c c.json --set utils.log_every=5 --resume auto"


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_or_cudnn_benchmark(tmp_path, monkeypatch, deterministic):
    """utils.deterministic, set when a run starts (the flags are global and readable on the CPU): false (the
    default) turns cuDNN's benchmark and its deterministic algorithms on, the pair the release's trainSSL.py sets,
    and leaves torch's deterministic algorithms off; true turns the benchmark off, cuDNN's deterministic algorithms
    and torch.use_deterministic_algorithms on (warn_only:
    a kernel without a deterministic form warns instead of stopping the run), with the cuBLAS workspace setting
    that determinism needs (a value already set is kept)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = deterministic, not deterministic
    torch.use_deterministic_algorithms(not deterministic)
    sets = tiny_sets(str(tmp_path / "run"), 2) | ({"utils.deterministic": True} if deterministic else {})
    try:
        Run(TRAIN_SSL, argv_of(sets) + ["--dry-run"])
        assert torch.backends.cudnn.benchmark is not deterministic
        assert torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic else None)
        if deterministic:
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
            Run(TRAIN_SSL, argv_of(sets) + ["--dry-run"])
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
