"""Progress and logs: plain lines without control characters off a terminal, a tqdm bar on one, train_log.jsonl,
and TensorBoard scalars and images (read back from the event files)."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainSSL
from data.synthetic import PALETTE, SyntheticStreets, export_folder
from tests.test_resume import one_thread, tiny_argv  # noqa: F401  (one_thread: autouse fixture)
from engine import curves
from engine.checkpoint import load_checkpoint
from engine.logger import TrainLogger
from engine.visualize import GAP, IGNORE_COLOUR, colorize_labels, panel, to_rgb_uint8

ITERATIONS = 4
CLASSES = ["road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """4 iterations on the synthetic scenes written out as a folder dataset (a user's own data), evaluations after
    iteration 2 and after the loop, 2 images per evaluation, a periodic checkpoint after iteration 2; output
    captured as a file (not a terminal), as under nohup or CI."""
    run_dir = str(tmp_path_factory.mktemp("logged"))
    config = export_folder(str(tmp_path_factory.mktemp("data")), num_train=24, num_val=2, image_size=(40, 60))
    argv = tiny_argv(run_dir, ITERATIONS, config, **{"utils.val_per_iter": 2, "utils.log_every": 1,
                                                     "utils.log_images": 2, "utils.save_latest_every": 100,
                                                     "utils.curves": True, "utils.save_checkpoint_every": 2})
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", out)
        trainSSL.main(argv)
    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return run_dir, out.getvalue(), ea


def test_plain_lines_off_a_terminal(logged_run):
    run_dir, text, _ = logged_run
    assert "\r" not in text and "\x1b" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("[train]")]
    assert [re.match(r"\[train\] iteration (\d+)/4 eta \d\d:\d\d:\d\d ", ln).group(1) for ln in lines] == [
        "0", "1", "2", "3"]
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "train_log.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [0, 1, 2, 3]
    for line, row in zip(lines, train):  # the printed running terms are those of train_log.jsonl
        for key in ("loss_sup", "loss_pseudo", "loss_entropy", "loss", "lr"):
            assert f" {key}={row[key]:.4g}" in line
    assert "loss_contr_l" in train[3] and "loss_contr_u" in train[3]
    assert [r["iteration"] for r in rows if r["kind"] == "val"] == [2, 4]
    assert "folder v2" in text  # trained on the folder dataset
    # per-class quantities are rows too: {"iteration", "kind", "values": {class: value}}
    per_class = {}
    for r in rows:
        if "values" in r:
            per_class.setdefault(r["kind"], {})[r["iteration"]] = r["values"]
    assert sorted(per_class) == ["class_weights", "memory_fill", "val_bn_refresh_iou", "val_iou"]
    assert sorted(per_class["memory_fill"]) == [0, 1, 2, 3] and sorted(per_class["val_iou"]) == [2, 4]
    counts = load_checkpoint(os.path.join(run_dir, "latest.pth"))["memory"]["counts"].tolist()
    assert list(per_class["memory_fill"][3].values()) == counts and list(per_class["memory_fill"][3]) == CLASSES
    report = json.load(open(os.path.join(run_dir, "evaluation.json")))
    # evaluation.json holds the best evaluation's IoU: one of the logged ones
    assert {k: (v if v == v else None) for k, v in report["iou"].items()} in (per_class["val_iou"][4],
                                                                              per_class["val_iou"][2],
                                                                              per_class["val_bn_refresh_iou"][4])


def test_one_iteration_number_everywhere(logged_run):
    """The console's train and val lines, train_log.jsonl, TensorBoard and the checkpoint names number an iteration
    alike (the release's loop index, from 0): the train rows of iterations 0..3 carry 0..3 everywhere with the same
    values; the evaluation after iteration 2 is "[val] iteration 2" on the console, iteration 2 in the log and step 2
    in TensorBoard, and it scored the network checkpoint-iter2.pth holds (evaluateSSL.py gives the same mIoU); the
    evaluation and checkpoint after the loop carry N = 4 (the release's checkpoint-iter<N>.pth)."""
    import evaluateSSL
    run_dir, text, ea = logged_run
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "train_log.jsonl"))]
    train = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    val = {r["iteration"]: r for r in rows if r["kind"] == "val"}
    printed = [int(m) for m in re.findall(r"^\[train\] iteration (\d+)/4 ", text, re.M)]
    assert printed == sorted(train) == [e.step for e in ea.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([train[i]["loss"] for i in range(4)])
    assert [int(m) for m in re.findall(r"^\[val\] iteration (\d+): mIoU", text, re.M)] == sorted(val) == [2, 4]
    assert [e.step for e in ea.Scalars("val/miou")] == [2, 4]
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-iter"))
    assert names == ["checkpoint-iter2.pth", "checkpoint-iter4.pth"]
    periodic = os.path.join(run_dir, "checkpoint-iter2.pth")
    assert load_checkpoint(periodic)["iteration"] == 2
    assert load_checkpoint(os.path.join(run_dir, "checkpoint-iter4.pth"))["iteration"] == 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", io.StringIO())
        scored = evaluateSSL.main(["-m", periodic, "--device", "cpu"])
    assert scored["miou"] == pytest.approx(val[2]["miou"], abs=1e-12)


def test_loss_columns_in_one_order_on_every_row(logged_run):
    """Every train row, printed and in train_log.jsonl, lists its loss terms in one order (total, supervised,
    pseudo-label, entropy, labeled and unlabeled contrastive), also when the contrastive terms join after the
    ramp-up."""
    from engine.log_window import TERM_ORDER
    run_dir, text, _ = logged_run
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "train_log.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    lines = [ln for ln in text.splitlines() if ln.startswith("[train]")]
    assert {len([k for k in r if k.startswith("loss")]) for r in train} == {4, 6}  # before and after the ramp-up
    for row, line in zip(train, lines):
        keys = [k for k in row if k.startswith("loss")]
        assert keys == [k for k in TERM_ORDER if k in row]
        assert [k.split("=")[0] for k in line.split() if k.startswith("loss")] == keys


def test_tensorboard_scalars(logged_run):
    run_dir, _, ea = logged_run
    tags = set(ea.Tags()["scalars"])
    losses = {f"train/{k}" for k in ("loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u", "loss")}
    per_class = {f"{group}/{c}" for group in ("class_weights", "memory_fill") for c in CLASSES}
    assert losses | {"train/lr", "train/ema_momentum", "val/miou"} | per_class <= tags
    # values: the poly learning rate, the memory fill of the last iteration, per-class IoU of the evaluations
    lr = {e.step: e.value for e in ea.Scalars("train/lr")}
    base = json.load(open(os.path.join(run_dir, "config.json")))["training"]["learning_rate"]
    assert lr == pytest.approx({i: base * (1 - i / ITERATIONS) ** 0.9 for i in range(ITERATIONS)}, rel=1e-6)
    counts = load_checkpoint(os.path.join(run_dir, "latest.pth"))["memory"]["counts"].tolist()
    assert counts == [ea.Scalars(f"memory_fill/{c}")[-1].value for c in CLASSES] and sum(counts) > 0
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "train_log.jsonl"))]
    val = {r["iteration"]: r["miou"] for r in rows if r["kind"] == "val"}
    assert {e.step: e.value for e in ea.Scalars("val/miou")} == pytest.approx(val)
    report = json.load(open(os.path.join(run_dir, "evaluation.json")))
    present = [c for c in CLASSES if report["iou"][c] == report["iou"][c]]  # not NaN
    assert present and {f"val_iou/{c}" for c in present} <= tags


def decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_tensorboard_images(logged_run):
    _, _, ea = logged_run
    tags = set(ea.Tags()["images"])
    assert {"val_images/0", "val_images/1", "unlabeled_images/0"} <= tags  # batch 2: one unlabeled image
    assert "val_images/2" not in tags
    assert [e.step for e in ea.Images("val_images/0")] == [2, 4]           # every evaluation
    assert [e.step for e in ea.Images("unlabeled_images/0")] == [2, 4]     # the batch of iterations 2 and 3

    # validation panel: image | ground truth | prediction, compared with the scene drawn independently
    image, label = SyntheticStreets(2, (40, 60), seed_offset=1, train=False).scene(1)
    panel = decode(ea.Images("val_images/1")[-1])
    assert panel.shape == (40, 3 * 60 + 2 * GAP, 3)
    assert np.array_equal(panel[:, :60], image)
    lut = np.array(PALETTE + [IGNORE_COLOUR] * (256 - len(PALETTE)), dtype=np.uint8)
    assert np.array_equal(panel[:, 60 + GAP:120 + GAP], lut[label])
    assert (panel[:, 60:60 + GAP] == 0).all()
    prediction = panel[:, 120 + 2 * GAP:].reshape(-1, 3)
    assert {tuple(c) for c in prediction} <= set(PALETTE)

    # unlabeled panel: rows image | pseudo-label, then the two strong views (33x49 crops)
    panel = decode(ea.Images("unlabeled_images/0")[-1])
    assert panel.shape == (3 * 33 + 2 * GAP, 2 * 49 + GAP, 3)
    pseudo = panel[:33, 49 + GAP:].reshape(-1, 3)
    assert {tuple(c) for c in pseudo} <= set(PALETTE)  # teacher argmax: never the ignore colour
    for view in (1, 2):
        mixed_labels = panel[view * (33 + GAP):view * (33 + GAP) + 33, 49 + GAP:].reshape(-1, 3)
        assert {tuple(c) for c in mixed_labels} <= set(PALETTE) | {IGNORE_COLOUR}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_lines_elsewhere(tmp_path):
    for stream in (FakeTerminal(), io.StringIO()):
        log = TrainLogger(str(tmp_path), total=10, start=2, tensorboard=False, stream=stream)
        for i in range(2, 5):
            log.advance(i)
            log.scalars(i, {"loss_sup": 0.5 + i, "loss": 1.25})
        log.close()
        text = stream.getvalue()
        if isinstance(stream, FakeTerminal):  # tqdm: the last iteration done, ETA and the running terms
            assert "\r" in text and "iteration 4/10: " in text and "5/10" not in text and "loss_sup=4.5" in text
            assert "<" in text and " 50%|" in text  # 5 of 10 iterations done
        else:
            assert "\r" not in text and "\x1b" not in text
            assert text.splitlines()[-1].startswith("[train] iteration 4/10 eta ") and "loss_sup=4.5 loss=1.25" in text


def test_resumed_logger_supersedes_events_after_the_checkpoint(tmp_path, monkeypatch):
    """Events logged after the last latest.pth by an interrupted run are dropped from TensorBoard on resume, and
    train_log.jsonl marks where the resumed rows start."""
    import types

    from tensorboard.summary.writer import event_file_writer

    # TensorBoard reads a folder's event files in name order: <seconds>.<host>.<pid>.<writer counter>. A resumed run
    # starts later, in another process; here both writers live in this process, within a second or two, and the
    # counter may pass from 9 to 10 (which sorts first): each writer's file gets its own second.
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    first = TrainLogger(str(tmp_path), total=6, start=0, stream=io.StringIO())
    for i in range(5):
        first.scalars(i, {"loss": float(i)})
    first.close()
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1_700_000_100.0))
    second = TrainLogger(str(tmp_path), total=6, start=3, stream=io.StringIO())
    for i in range(3, 6):
        second.scalars(i, {"loss": 10.0 + i})
    second.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(0, 0), (1, 1), (2, 2), (3, 13), (4, 14), (5, 15)]
    rows = [json.loads(ln) for ln in open(tmp_path / "train_log.jsonl")]
    assert [(r["kind"], r["iteration"]) for r in rows][4:6] == [("train", 4), ("resume", 3)]


def test_picture_helpers():
    rgb = torch.tensor([[[10.4]], [[20.6]], [[300.0]]])  # [3,1,1], values beyond 255 clip
    assert to_rgb_uint8(rgb, "RGB").flatten().tolist() == [10, 21, 255]
    assert to_rgb_uint8(rgb.flip(0), "BGR").flatten().tolist() == [10, 21, 255]  # BGR input shown as RGB
    labels = torch.tensor([[0, 1, 250, 7, -1, 300]])
    colours = colorize_labels(labels, PALETTE[:2], ignore_label=250)
    assert colours.shape == (3, 1, 6)
    assert [tuple(colours[:, 0, k].tolist()) for k in range(6)] == [PALETTE[0], PALETTE[1]] + [IGNORE_COLOUR] * 4
    grid = panel([[torch.full((3, 2, 2), 9, dtype=torch.uint8), torch.full((3, 4, 4), 7, dtype=torch.uint8)]])
    assert grid.shape == (3, 2, 4 + GAP) and (grid[:, :, :2] == 9).all() and (grid[:, :, 2 + GAP:] == 7).all()
    assert (grid[:, :, 2:2 + GAP] == 0).all()


def test_curves_png_after_a_run(logged_run):
    run_dir, _, _ = logged_run
    path = os.path.join(run_dir, "curves.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (960, 640)
        pixels = np.asarray(img.convert("RGB"))
    assert 0.02 < (pixels < 200).any(axis=-1).mean() < 0.5  # lines and text drawn: not blank, not filled
    assert not [n for n in os.listdir(run_dir) if n.startswith("curves.png.")]  # no temporary file left
    # what is drawn: the logged loss terms, learning rate, both evaluations (points) and the memory fill per class
    data = curves.series(curves.read_log(os.path.join(run_dir, "train_log.jsonl")))
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "train_log.jsonl"))]
    assert set(data["loss"]) == {"loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u", "loss"}
    assert data["lr"]["learning rate"][0] == [0, 1, 2, 3]
    assert data["miou"]["validation"] == ([2, 4], [100 * r["miou"] for r in rows if r["kind"] == "val"])
    assert list(data["memory_fill"]) == CLASSES and data["memory_fill"]["road"][0] == [0, 1, 2, 3]


def test_curves_keep_the_rows_of_a_resumed_run(tmp_path):
    """Rows an interrupted run logged after its last latest.pth are superseded by the resumed run's."""
    rows = [{"iteration": i, "kind": "train", "loss": float(i), "lr": 0.1} for i in range(5)]
    rows += [{"iteration": 3, "kind": "resume"}]
    rows += [{"iteration": i, "kind": "train", "loss": 10.0 + i, "lr": 0.1} for i in range(3, 6)]
    rows += [{"iteration": 5, "kind": "val", "miou": 0.25}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 6, "ki')
    data = curves.series(curves.read_log(str(tmp_path / "train_log.jsonl")))  # the cut last line is skipped
    assert data["loss"]["loss"] == ([0, 1, 2, 3, 4, 5], [0.0, 1.0, 2.0, 13.0, 14.0, 15.0])
    assert data["miou"] == {"validation": ([5], [25.0])} and data["memory_fill"] == {}
    assert curves.draw_curves(str(tmp_path)) == str(tmp_path / "curves.png")  # empty panels are fine
    assert Image.open(tmp_path / "curves.png").format == "PNG"


def test_eta_leaves_out_evaluation_time(tmp_path, monkeypatch):
    """1 s per iteration, then a 100 s evaluation: the ETA stays at 1 s per remaining iteration, on the plain
    lines and on the tqdm bar."""
    clock = [1000.0]
    monkeypatch.setattr("engine.logger.time.time", lambda: clock[0])
    monkeypatch.setattr("engine.logger.draw_curves", lambda run_dir: None)
    for stream in (io.StringIO(), FakeTerminal()):
        log = TrainLogger(str(tmp_path), total=10, start=0, tensorboard=False, stream=stream)
        if log.bar is not None:  # the bar's own clock, and an update at every call
            log.bar._time = lambda: clock[0]
            log.bar.start_t = log.bar.last_print_t = clock[0]
            log.bar.mininterval, log.bar.miniters = 0, 1
        for i in range(4):
            clock[0] += 1.0
            log.advance(i)
            if i == 1:  # an evaluation after iteration 1
                log.evaluation_started()
                clock[0] += 100.0
                log.evaluation_finished()
            log.scalars(i, {"loss": 1.0})
        if log.bar is not None:
            assert log.bar.format_dict["rate"] == pytest.approx(1.0)
            assert log.bar.format_dict["elapsed"] == pytest.approx(4.0)
        else:
            etas = re.findall(r"eta (\d\d:\d\d:\d\d)", stream.getvalue())
            assert etas == ["00:00:09", "00:00:08", "00:00:07", "00:00:06"]
        log.close()


def test_curves_redrawn_at_evaluations_at_most_every_30_s_and_at_close(tmp_path, monkeypatch):
    clock, drawn = [1000.0], []
    monkeypatch.setattr("engine.logger.time.time", lambda: clock[0])
    monkeypatch.setattr("engine.logger.draw_curves", lambda run_dir: drawn.append(clock[0]))
    log = TrainLogger(str(tmp_path), total=10, start=0, tensorboard=False, stream=io.StringIO())
    for t in (1010.0, 1040.0, 1050.0, 1075.0):  # evaluations ending at these times
        clock[0] = t
        log.evaluation_started()
        log.evaluation_finished()
    clock[0] = 1080.0
    log.close()
    assert drawn == [1040.0, 1075.0, 1080.0]


def test_utils_curves_false_draws_nothing(tmp_path, monkeypatch):
    """utils.curves false (the tests' tiny runs): no curves.png at evaluations or at close; the log is written."""
    clock, drawn = [1000.0], []
    monkeypatch.setattr("engine.logger.time.time", lambda: clock[0])
    monkeypatch.setattr("engine.logger.draw_curves", lambda run_dir: drawn.append(clock[0]))
    log = TrainLogger(str(tmp_path), total=10, start=0, tensorboard=False, curves=False, stream=io.StringIO())
    for t in (1040.0, 1080.0):
        clock[0] = t
        log.evaluation_started()
        log.evaluation_finished()
    log.scalars(0, {"loss": 1.0})
    log.close()
    assert drawn == [] and os.path.isfile(tmp_path / "train_log.jsonl")


def test_run_passes_utils_curves_to_its_logger(tmp_path):
    from tests.run_helpers import argv_of, tiny_sets
    from engine.run import Run
    from utils.variants import TRAIN_SSL
    for value in (False, True):
        run = Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / str(value)), 1, **{"utils.curves": value})))
        assert run.logger.curves is value
        run.logger.close()
