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
    assert cb.count == 4  # the release's one counter: one step per unlabeled update


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
    assert cb.count == 0  # a labeled update does not advance the counter
    # f = (1,2) + (1,0) = (2,2) -> ones, but now because the weights are equal
    assert_weights(cb.update(None, torch.tensor([0])), [1.0, 1.0])
    assert cb.filled and cb.count == 1


# Labeled and unlabeled batches of the counter tests below (C = 3) and their counts, by hand.
L1, U1 = t([0, 0, 0, 1]), t([1, 1, 2, 2])      # (3,1,0), (0,2,2)
L2, U2 = t([0, 1, 1, 1]), t([2, 2, 2, 0])      # (1,3,0), (1,0,3)
L3, U3 = t([0, 0, 2, IGN]), t([1, 1, 1, 1])    # (2,0,1), (0,4,0)
# After three labeled and three unlabeled updates with 3 labeled slots and 2 unlabeled ones: labeled (6,4,1),
# unlabeled U3 (ring slot 0) + U2 = (1,4,3); f = (7,8,4), median 7 -> sqrt(7/7, 7/8, 7/4).
AFTER_THREE = [1.0, math.sqrt(7 / 8), math.sqrt(7 / 4)]


def test_counter_train_ssl_more_labeled_slots_than_unlabeled():
    """trainSSL.py adds both each iteration; full once the counter reaches max(3, 2) = 3."""
    cb = ClassBalancing(3, labeled_slots=3, unlabeled_slots=2)
    assert_weights(cb.update(L1, U1), [1.0] * 3)
    assert_weights(cb.update(L2, U2), [1.0] * 3)  # the unlabeled history is full, the labeled one is not
    assert_weights(cb.update(L3, U3), AFTER_THREE)
    assert cb.count == 3 and cb.labeled.tolist() == [[3, 1, 0], [1, 3, 0], [2, 0, 1]]


def test_counter_less_memory_alternation_more_labeled_slots():
    """trainSSL_less_memory.py: labeled steps write slot `count` without advancing it; unlabeled steps advance it.
    The third labeled step (count 2 < 3) still gives ones although all three labeled slots are written."""
    cb = ClassBalancing(3, labeled_slots=3, unlabeled_slots=2)
    expected_count = [0, 1, 1, 2, 2, 3]
    for k, (labels, pseudo) in enumerate([(L1, None), (None, U1), (L2, None), (None, U2), (L3, None)]):
        assert_weights(cb.update(labels, pseudo), [1.0] * 3)
        assert cb.count == expected_count[k], k
    assert cb.labeled.tolist() == [[3, 1, 0], [1, 3, 0], [2, 0, 1]]
    assert_weights(cb.update(None, U3), AFTER_THREE)
    assert cb.count == 3
    assert_weights(cb.update(t([2, 2, 2, 2]), None), AFTER_THREE)  # labeled history full: not counted
    assert cb.count == 3 and cb.labeled.tolist() == [[3, 1, 0], [1, 3, 0], [2, 0, 1]]


def test_counter_less_memory_alternation_more_unlabeled_slots():
    """1 labeled slot, 2 unlabeled: the second labeled batch (count 1) is not counted; full after U2.
    f = (3,1,0) + (0,2,2) + (1,0,3) = (4,3,5), median 4 -> sqrt(1, 4/3, 4/5)."""
    cb = ClassBalancing(3, labeled_slots=1, unlabeled_slots=2)
    for labels, pseudo in [(L1, None), (None, U1), (L2, None)]:
        assert_weights(cb.update(labels, pseudo), [1.0] * 3)
    assert cb.labeled.tolist() == [[3, 1, 0]] and cb.count == 1
    assert_weights(cb.update(None, U2), [1.0, math.sqrt(4 / 3), math.sqrt(4 / 5)])


def test_old_state_dict_counter():
    """A state written before the single counter (labeled_count / unlabeled_count) resumes with the unlabeled count."""
    a = ClassBalancing(3, 3, 2)
    for labels, pseudo in [(L1, U1), (L2, U2)]:
        a.update(labels, pseudo)
    old = {"labeled": a.labeled.clone(), "unlabeled": a.unlabeled.clone(), "labeled_count": 2, "unlabeled_count": 2}
    b = ClassBalancing(3, 3, 2)
    b.load_state_dict(old)
    assert b.count == 2
    assert_weights(b.update(L3, U3), AFTER_THREE)


def test_slot_helpers():
    assert ClassBalancing.labeled_slots_for(372, 8) == 46
    assert ClassBalancing.unlabeled_slots_for(2975, 372, 8) == (2975 - 372) // 4
    assert ClassBalancing.labeled_slots_for(3, 8) == 1
    assert ClassBalancing.unlabeled_slots_for(10, 10, 8) == 1
    assert ClassBalancing.unlabeled_slots_for(20, 10, 1) == 10
    assert ClassBalancing.labeled_slots_for(5, 1) == 5                   # a batch of one: a slot per image
    slots = ClassBalancing.unlabeled_slots_for(20, 10, 3)                 # 10 // (3 // 2): half a batch, floored
    assert slots == 10 and type(slots) is int


def test_new_histories_and_bounds():
    """One class, one slot each is valid: zero int64 histories [slots, C] and a zero counter; 0 in any of the three
    is refused with the three values named and the settings to check."""
    cb = ClassBalancing(1, labeled_slots=1, unlabeled_slots=2)
    assert cb.labeled.dtype == cb.unlabeled.dtype == torch.int64
    assert cb.labeled.tolist() == [[0]] and cb.unlabeled.tolist() == [[0], [0]] and cb.count == 0
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the weights stay float32 whatever torch's default dtype (here the ones before the histories fill)
        assert_weights(cb.weights(), [1.0])
    finally:
        torch.set_default_dtype(old)
    for bad in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(UserError) as err:
            ClassBalancing(*bad)
        assert str(err.value) == ("class balancing needs num_classes, labeled_slots and unlabeled_slots >= 1, got "
                                  f"{bad[0]}, {bad[1]}, {bad[2]}; check labeled_samples and batch_size.")


def test_state_dict_round_trip_and_mismatch():
    a = ClassBalancing(3, 2, 2)
    for lab, unl in [([0, 0, 1, IGN], [0, 1, 1, 5]), ([0, 1, 1, 1], [0, 0, 0, IGN]), ([2] * 4, [1] * 4)]:
        a.update(t(lab), t(unl))
    b = ClassBalancing(3, 2, 2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(), b.weights())
    assert b.count == 3
    # the restored ring buffer continues where it stopped
    assert torch.equal(a.update(t([0] * 4), t([2, 0, IGN, 7])), b.update(t([0] * 4), t([2, 0, IGN, 7])))
    # the message names the history, the shape found and the shape expected (slots x classes)
    with pytest.raises(UserError, match=r"has unlabeled history \(2, 3\), expected \(5, 3\);"):
        ClassBalancing(3, 2, 5).load_state_dict(a.state_dict())
    missing = {k: v for k, v in a.state_dict().items() if k != "labeled"}
    with pytest.raises(UserError, match=r"has labeled history missing, expected \(2, 3\);"):
        ClassBalancing(3, 2, 2).load_state_dict(missing)
