"""Class balancing (SPEC 5.3) on a scripted sequence with counts worked out by hand."""
import math

import pytest
import torch

from utils.class_balancing import ClassBalancing
from utils.errors import UserError

IGN = 250


def t(values):
    return torch.tensor(values, dtype=torch.int64).reshape(1, 2, 2)  # [B,H,W]


def assert_weights(w, expected):
    assert w.dtype == torch.float32 and w.shape == (len(expected),)
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)


def test_scripted_sequence_c3():
    cb = ClassBalancing(num_classes=3, labeled_slots=2, unlabeled_slots=2)
    # 1: labeled (2,1,0) [250 dropped]; unlabeled (1,2,0) [5 >= C dropped]
    w = cb.update(t([0, 0, 1, IGN]), t([0, 1, 1, 5]))
    assert_weights(w, [1.0, 1.0, 1.0])  # neither history full
    assert cb.labeled[0].tolist() == [2, 1, 0] and cb.unlabeled[0].tolist() == [1, 2, 0]
    # 2: labeled (1,3,0); unlabeled (3,0,0) -> both full. f = (3,4,0) + (4,2,0) = (7,6,0);
    # median 6; w = (6/7, 1, inf); the unseen class gets max(1, largest finite = 1) = 1
    w = cb.update(t([0, 1, 1, 1]), t([0, 0, 0, IGN]))
    assert_weights(w, [math.sqrt(6 / 7), 1.0, 1.0])
    # 3: labeled history is full -> these class-2 pixels are NOT counted; unlabeled (0,4,0)
    # overwrites slot 0 (was (1,2,0)): f = (3,4,0) + (0,4,0) + (3,0,0) = (6,8,0); median 6
    w = cb.update(t([2, 2, 2, 2]), t([1, 1, 1, 1]))
    assert cb.labeled.tolist() == [[2, 1, 0], [1, 3, 0]]
    assert cb.unlabeled.tolist() == [[0, 4, 0], [3, 0, 0]]
    assert_weights(w, [1.0, math.sqrt(6 / 8), 1.0])
    # 4: unlabeled (1,0,1) [250 and 7 dropped] overwrites slot 1: f = (3,4,0)+(0,4,0)+(1,0,1) = (4,8,1)
    # median 4 -> w = (1, 1/2, 4) -> sqrt = (1, 1/sqrt2, 2)
    w = cb.update(t([2, 2, 2, 2]), t([2, 0, IGN, 7]))
    assert_weights(w, [1.0, math.sqrt(0.5), 2.0])
    assert cb.labeled_count == 2 and cb.unlabeled_count == 4


def test_ones_until_unlabeled_history_is_full():
    cb = ClassBalancing(3, labeled_slots=1, unlabeled_slots=3)
    for _ in range(2):
        assert_weights(cb.update(t([0, 0, 0, 1]), t([1, 1, 1, 2])), [1.0, 1.0, 1.0])
    # f = (3,1,0) + 3 * (0,3,1) = (3,10,3); median 3 -> (1, 0.3, 1)
    assert_weights(cb.update(t([0, 0, 0, 1]), t([1, 1, 1, 2])), [1.0, math.sqrt(0.3), 1.0])


def test_even_c_median_and_unseen_class_gets_largest_finite_weight():
    cb = ClassBalancing(4, labeled_slots=1, unlabeled_slots=1)
    # f = labeled (2,1,2,0) + unlabeled (6,1,2,0) = (8,2,4,0); numpy median of (0,2,4,8) = 3
    # w = (3/8, 3/2, 3/4, inf) -> unseen class gets max(1, 3/2) = 3/2
    labeled = torch.tensor([[0, 0, 1, 2, 2, IGN]])
    unlabeled = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2, 2]])
    w = cb.update(labeled, unlabeled)
    assert_weights(w, [math.sqrt(3 / 8), math.sqrt(1.5), math.sqrt(3 / 4), math.sqrt(1.5)])


def test_median_zero_keeps_released_behaviour():
    # f = (5,0,0): median 0 -> seen class weight 0, unseen get max(1, largest finite 0) = 1
    cb = ClassBalancing(3, 1, 1)
    w = cb.update(torch.tensor([0, 0, 0]), torch.tensor([0, 0, IGN]))
    assert_weights(w, [0.0, 1.0, 1.0])


def test_separate_updates_with_none():
    cb = ClassBalancing(2, 1, 1)
    assert_weights(cb.update(torch.tensor([0, 1, 1]), None), [1.0, 1.0])
    assert cb.unlabeled_count == 0
    # f = (1,2) + (1,0) = (2,2) -> ones, but now because the weights are equal
    assert_weights(cb.update(None, torch.tensor([0])), [1.0, 1.0])
    assert cb.filled and cb.labeled_count == 1


def test_slot_helpers():
    assert ClassBalancing.labeled_slots_for(372, 8) == 46
    assert ClassBalancing.unlabeled_slots_for(2975, 372, 8) == (2975 - 372) // 4
    assert ClassBalancing.labeled_slots_for(3, 8) == 1
    assert ClassBalancing.unlabeled_slots_for(10, 10, 8) == 1
    assert ClassBalancing.unlabeled_slots_for(20, 10, 1) == 10


def test_state_dict_round_trip_and_mismatch():
    a = ClassBalancing(3, 2, 2)
    for lab, unl in [([0, 0, 1, IGN], [0, 1, 1, 5]), ([0, 1, 1, 1], [0, 0, 0, IGN]), ([2] * 4, [1] * 4)]:
        a.update(t(lab), t(unl))
    b = ClassBalancing(3, 2, 2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(), b.weights())
    assert b.unlabeled_count == 3
    # the restored ring buffer continues where it stopped
    assert torch.equal(a.update(t([0] * 4), t([2, 0, IGN, 7])), b.update(t([0] * 4), t([2, 0, IGN, 7])))
    with pytest.raises(UserError, match="unlabeled history"):
        ClassBalancing(3, 2, 5).load_state_dict(a.state_dict())
