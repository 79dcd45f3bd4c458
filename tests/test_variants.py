"""utils/variants.py: the constants that differ between the three training scripts, the domain-adaptation source
schedule of both fidelity presets, and how a config's explicit method constants override the script's own."""
import json
import os

import pytest

from tests.fixtures_data import make_cityscapes_tree, make_gta5_tree
from engine.config import FIDELITY_PRESETS
from utils.ema import ema_alpha
from engine.run import Run
from utils.variants import DOMAIN_ADAPTATION, LESS_MEMORY, TRAIN_SSL, uses_gta5_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITY_CONFIG = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_imagenet.json")


def test_variant_table():
    # SPEC 4, 5.5, 9: EMA warm-up 1 - 1/(10 i + 1) only in trainSSL.py; contrastive 0.2 and labeled ClassMix 0.25
    # only in domain adaptation; alternating steps only in the less-memory script; GTA5 only in domain adaptation
    # As read in the released scripts: only the less-memory one doubles num_iterations; only trainSSL.py puts the
    # teacher in periodic checkpoints under save_teacher_test; the other two multiply the entropy by the
    # unsqueezed [n,1,h,w] mask.
    rows = [(v.name, v.ema_warmup_div, v.contrastive_weight, v.labeled_classmix_prob, v.alternating_steps, v.uses_gta5,
             v.steps_per_iteration, v.teacher_in_periodic_checkpoint, v.entropy_mask_broadcast)
            for v in (TRAIN_SSL, LESS_MEMORY, DOMAIN_ADAPTATION)]
    assert rows == [
        ("trainSSL", 10, 0.1, 0.2, False, False, 1, True, False),
        ("trainSSL_less_memory", 1, 0.1, 0.2, True, False, 2, False, True),
        ("trainSSL_domain_adaptation_targetCity", 1, 0.2, 0.25, False, True, 1, False, True),
    ]


def test_ema_warmup_of_each_variant():
    # i = 1, N = 1000: m_1 = 1 - 0.005 (cos(pi/1000) + 1)/2 = 0.99500001...; warm-up 1 - 1/11 resp. 1 - 1/2
    assert ema_alpha(1, 1000, TRAIN_SSL.ema_warmup_div) == pytest.approx(10 / 11)
    assert ema_alpha(1, 1000, LESS_MEMORY.ema_warmup_div) == pytest.approx(0.5)
    assert ema_alpha(1, 1000, DOMAIN_ADAPTATION.ema_warmup_div) == pytest.approx(0.5)
    # i = 100: 1 - 1/1001 = 0.999 > m_100 = 0.995122 for trainSSL; 1 - 1/101 = 0.990099 < m_100 for the others
    assert ema_alpha(100, 1000, TRAIN_SSL.ema_warmup_div) == pytest.approx(0.99512236, abs=1e-7)
    assert ema_alpha(100, 1000, LESS_MEMORY.ema_warmup_div) == pytest.approx(100 / 101)


def gta5_iterations(n: int, schedule: str) -> list[int]:
    return [i for i in range(n) if uses_gta5_batch(i, n, schedule)]


def test_code_schedule_gta5_only_on_odd_iterations_of_the_last_100():
    assert FIDELITY_PRESETS["code"].da_source_schedule == "last100_odd"
    assert gta5_iterations(6, "last100_odd") == [1, 3, 5]          # all 6 iterations are among the last 100
    assert gta5_iterations(100, "last100_odd") == list(range(1, 100, 2))
    # N = 105: the last 100 are i = 5..104; i = 3 is odd but before them
    assert gta5_iterations(105, "last100_odd") == list(range(5, 105, 2))
    assert gta5_iterations(106, "last100_odd") == list(range(7, 106, 2))  # i = 6..105; 6 is even
    assert len(gta5_iterations(1000, "last100_odd")) == 50


def test_paper_schedule_alternates_then_cityscapes_only():
    assert FIDELITY_PRESETS["paper"].da_source_schedule == "alternate"
    assert gta5_iterations(100, "alternate") == []                  # the whole run is its last 100
    assert gta5_iterations(101, "alternate") == [0]
    assert gta5_iterations(103, "alternate") == [0, 2]              # i = 3..102 are the last 100
    assert gta5_iterations(106, "alternate") == [0, 2, 4]
    n = 1000
    assert gta5_iterations(n, "alternate") == list(range(0, 900, 2))
    # alternation: before the last 100, consecutive iterations use different sources
    assert all(uses_gta5_batch(i, n, "alternate") != uses_gta5_batch(i + 1, n, "alternate") for i in range(899))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        uses_gta5_batch(0, 10, "sometimes")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    city = str(tmp_path_factory.mktemp("CityScapes"))
    make_cityscapes_tree(city, n_train=6, n_val=1, size=(40, 60))
    gta5 = str(tmp_path_factory.mktemp("GTA5"))
    make_gta5_tree(gta5, n_train=2, n_val=1, size=(40, 60))  # batches of 2 from the train split
    return city, gta5


def resolved_method(variant, config: str, trees, tmp_path, *sets: str) -> dict:
    """The method constants a script would run with (a --dry-run Run: config, data and a shape-only model)."""
    city, gta5 = trees
    argv = ["--config", config, "--data-root", city, "--device", "cpu", "--dry-run",
            "--set", "backbone.depth=18", "--set", "training.data.labeled_samples=4",
            "--set", "training.batch_size=2", "--set", "training.num_workers=0",
            "--set", "training.data.split_id_list=-1",  # split 0 is the release's split of all 2975 images
            "--set", f"utils.checkpoint_dir={tmp_path / 'run'}"]
    for s in sets:
        argv += ["--set", s]
    if variant.uses_gta5:  # a flag of the domain-adaptation script only
        argv += ["--gta5-root", gta5]
    return Run(variant, argv).method


def test_null_constants_take_the_script_values(trees, tmp_path, capsys):
    for variant, weight, mix in ((TRAIN_SSL, 0.1, 0.2), (LESS_MEMORY, 0.1, 0.2), (DOMAIN_ADAPTATION, 0.2, 0.25)):
        m = resolved_method(variant, CITY_CONFIG, trees, tmp_path)
        assert (m["contrastive_weight"], m["labeled_classmix_prob"]) == (weight, mix), variant.name
    assert "dry run: OK" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "run")  # a dry run writes nothing


def test_explicit_config_constants_override_the_script_values(trees, tmp_path):
    cfg = json.load(open(CITY_CONFIG))
    cfg["method"] = {"contrastive_weight": 0.5, "labeled_classmix_prob": 0.0}
    path = tmp_path / "explicit.json"
    path.write_text(json.dumps(cfg))
    for variant in (TRAIN_SSL, LESS_MEMORY, DOMAIN_ADAPTATION):
        m = resolved_method(variant, str(path), trees, tmp_path)
        assert (m["contrastive_weight"], m["labeled_classmix_prob"]) == (0.5, 0.0), variant.name
    # --set too, and an explicit value equal to another script's default is kept as given
    m = resolved_method(DOMAIN_ADAPTATION, CITY_CONFIG, trees, tmp_path, "method.contrastive_weight=0.1")
    assert (m["contrastive_weight"], m["labeled_classmix_prob"]) == (0.1, 0.25)
