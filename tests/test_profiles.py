import numpy as np
import pytest

from longtail.data import class_counts
from longtail.errors import ConfigError


@pytest.mark.parametrize("ratio, c10, c100", [(100, 12406, 10847), (50, 13996, 12608), (10, 20431, 19573)])
def test_exp_totals_match_ldam(ratio, c10, c100):
    assert class_counts("exp", 10, 5000, ratio).sum() == c10
    assert class_counts("exp", 100, 500, ratio).sum() == c100


def test_exp_cifar10_counts_by_hand():
    # int(5000 * 0.01 ** (i / 9)) for i = 0..9
    assert class_counts("exp", 10, 5000, 100).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_ratio_one_is_balanced():
    assert class_counts("exp", 5, 30, 1).tolist() == [30] * 5


def test_step_profile():
    assert class_counts("step", 10, 5000, 100).tolist() == [5000] * 5 + [50] * 5
    assert class_counts("step", 10, 100, 10, step_fraction=0.3).tolist() == [100] * 3 + [10] * 7


def test_pareto_profile_endpoints_and_limit():
    counts = class_counts("pareto", 1000, 1280, 256)
    assert counts[0] == 1280 and counts[-1] == 5
    assert np.all(np.diff(counts) <= 0)
    assert abs(int(counts.sum()) - 115_846) < 0.002 * 115_846  # ImageNet-LT's training-list size
    # a -> 0 recovers the exponential profile
    assert np.abs(class_counts("pareto", 10, 5000, 100, pareto_shape=1e-9) - class_counts("exp", 10, 5000, 100)).max() <= 1


@pytest.mark.parametrize("bad", [0.5, 0, -3, float("nan"), float("inf"), "ten", None])
def test_bad_imbalance_ratio(bad):
    with pytest.raises(ConfigError, match="imbalance ratio"):
        class_counts("exp", 10, 5000, bad)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile"):
        class_counts("zipf", 10, 5000, 10)


def test_pareto_default_is_one_number_everywhere(capsys):
    """config default == profiles default == `longtail data counts` == a training data build == docs/data.md."""
    from conftest import REPO
    from longtail.cli import main
    from longtail.config import DataConfig
    from longtail.data import build_data
    from longtail.data.profiles import PARETO_DEFAULT_SHAPE

    assert DataConfig().pareto_shape == PARETO_DEFAULT_SHAPE
    assert f"a = `data.pareto_shape` (default {PARETO_DEFAULT_SHAPE:g})" in (REPO / "docs/data.md").read_text()
    assert main(["data", "counts", "--profile", "pareto", "--num-classes", "10", "--max-count", "100",
                 "--imbalance-ratio", "10"]) == 0
    printed = [int(line.split()[2]) for line in capsys.readouterr().out.splitlines() if line.startswith("class ")]
    expected = class_counts("pareto", 10, 100, 10, pareto_shape=PARETO_DEFAULT_SHAPE).tolist()
    assert printed == expected
    assert expected != class_counts("pareto", 10, 100, 10, pareto_shape=0.9).tolist()  # the shape matters here
    data = build_data(DataConfig(source="digits", profile="pareto", imbalance_ratio=10, max_count=100))
    assert data.class_counts.tolist() == expected
