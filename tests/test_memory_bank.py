"""Class-wise memory bank (SPEC 5.2, section 8 "memory: which q vectors are kept")."""
import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.memory_bank import MemoryBank, per_class_quota


def monotone_selectors(num: int, dim: int) -> list[nn.Sequential]:
    """Score increasing in x[0]: Linear picks x[0], BN (gamma 1) and LeakyReLU are increasing, output 3a + 0.5."""
    out = []
    for _ in range(num):
        s = nn.Sequential(nn.Linear(dim, 1), nn.BatchNorm1d(1), nn.LeakyReLU(0.2), nn.Linear(1, 1))
        with torch.no_grad():
            s[0].weight.zero_()
            s[0].weight[0, 0] = 1.0
            s[0].bias.zero_()
            s[3].weight.fill_(3.0)
            s[3].bias.fill_(0.5)
        out.append(s)
    return out


def rows(*pairs):
    return torch.tensor(pairs, dtype=torch.float32)


def first_coords(bank: MemoryBank, c: int) -> list[float]:
    return bank.class_memory(c)[:, 0].tolist()


# x[0] is the score key, x[1] a tag
FIRST = rows((3, 10), (1, 11), (7, 20), (4, 12), (0, 13), (8, 21), (2, 14))
FIRST_LABELS = torch.tensor([0, 0, 1, 0, 0, 1, 0])   # class 0: keys 3,1,4,0,2 (5 > quota 2); class 1: 7, 8


@pytest.mark.parametrize("keep, expected", [("lowest", [0.0, 1.0]), ("highest", [4.0, 3.0])])
def test_quota_selects_by_score_and_orders(keep, expected):
    bank = MemoryBank(3, size=8, dim=2)
    sel = monotone_selectors(3, 2)
    bank.add(FIRST, FIRST_LABELS, sel, quota=2, keep=keep)
    assert bank.counts.tolist() == [2, 2, 0]
    assert first_coords(bank, 0) == expected          # the q lowest ascending / the q highest descending
    assert first_coords(bank, 1) == [7.0, 8.0]        # <= quota: all, in the given order
    assert bank.class_memory(2).shape == (0, 2)
    # Only the ranked class ran its selector in train mode: its BN statistics moved, the others did not.
    assert [s[1].num_batches_tracked.item() for s in sel] == [1, 0, 0]
    # Second add: the new vectors go in front (newest first).
    bank.add(rows((5, 30), (9, 31)), torch.tensor([0, 2]), sel, quota=2, keep=keep)
    assert first_coords(bank, 0) == [5.0] + expected
    assert first_coords(bank, 2) == [9.0]
    assert bank.fill().tolist() == [3, 2, 1]
    assert torch.equal(bank.memory[0, 3:], torch.zeros(5, 2))   # unused slots stay empty


def test_truncation_keeps_newest():
    bank = MemoryBank(2, size=4, dim=2)
    sel = monotone_selectors(2, 2)
    bank.add(rows((1, 0), (2, 0), (3, 0)), torch.tensor([1, 1, 1]), sel, quota=5)
    bank.add(rows((4, 0), (5, 0), (6, 0)), torch.tensor([1, 1, 1]), sel, quota=5)
    assert first_coords(bank, 1) == [4.0, 5.0, 6.0, 1.0]   # newest 3, then the newest of the older add
    assert bank.counts.tolist() == [0, 4]
    # more new vectors than the bank holds: the first `size` of them, in order
    bank.add(rows(*[(float(v), 0) for v in range(10, 16)]), torch.ones(6, dtype=torch.long), sel, quota=6)
    assert first_coords(bank, 1) == [10.0, 11.0, 12.0, 13.0]


def test_vectorised_add_matches_loop_random():
    """Many classes, several adds: the vectorised bank equals a plain per-class list implementation."""
    torch.manual_seed(0)
    C, S, D, q = 6, 10, 4, 3
    bank = MemoryBank(C, size=S, dim=D)
    sel = monotone_selectors(C, D)
    ref = [torch.zeros(0, D) for _ in range(C)]
    for step in range(5):
        n = 25
        x = torch.randn(n, D)
        y = torch.randint(0, C - 1, (n,))   # class C-1 never appears
        bank.add(x, y, sel, quota=q, keep="lowest")
        for c in range(C):
            xc = x[y == c]
            if len(xc) > q:                  # monotone selector: ranking by x[:, 0]
                xc = xc[torch.argsort(xc[:, 0], stable=True)[:q]]
            ref[c] = torch.cat([xc, ref[c]])[:S]
    for c in range(C):
        assert torch.equal(bank.class_memory(c), ref[c])


def test_state_dict_round_trip_and_checks():
    bank = MemoryBank(3, size=4, dim=2)
    sel = monotone_selectors(3, 2)
    bank.add(FIRST, FIRST_LABELS, sel, quota=2)
    state = bank.state_dict()
    other = MemoryBank(3, size=4, dim=2)
    other.load_state_dict(state)
    assert torch.equal(other.memory, bank.memory) and torch.equal(other.counts, bank.counts)
    bank.add(rows((1, 1)), torch.tensor([2]), sel, quota=2)
    assert other.counts.tolist() == [2, 2, 0]   # the state was a copy
    with pytest.raises(UserError, match="memory bank"):
        MemoryBank(3, size=8, dim=2).load_state_dict(state)
    with pytest.raises(UserError, match="counts"):
        other.load_state_dict({"memory": state["memory"], "counts": torch.tensor([0, 5, 0])})


def test_user_errors():
    bank = MemoryBank(2, size=4, dim=2)
    sel = monotone_selectors(2, 2)
    with pytest.raises(UserError, match="keep"):
        bank.add(rows((1, 1)), torch.tensor([0]), sel, quota=2, keep="best")
    with pytest.raises(UserError, match="size 2"):
        bank.add(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), sel, quota=2)
    bank.add(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), sel, quota=2)   # nothing to add is fine
    assert bank.counts.tolist() == [0, 0]


def test_per_class_quota():
    assert per_class_quota("cityscapes", 5, 100, 19) == 15        # 5 * round(2.56)
    assert per_class_quota("cityscapes", 5, 372, 19) == 5         # 5 * max(1, round(0.688))
    assert per_class_quota("cityscapes", 5, 744, 19) == 5         # round(0.344) = 0 -> 1
    assert per_class_quota("cityscapes", 1, 512, 19) == 1         # round(0.5) = 0 (banker's) -> 1
    assert per_class_quota("cityscapes", 1, 103, 19) == 2         # round(2.485) = 2
    assert per_class_quota("pascal_voc", 14, 212, 21) == 98       # 14 * int(7 * round(1.2075))
    assert per_class_quota("pascal_voc", 14, 1323, 21) == 14      # 14 * max(1, int(7 * 0))
    assert per_class_quota("pascal_voc", 14, 530, 21) == 14       # round(0.483) = 0
    assert per_class_quota("pascal_voc", 8, 102, 21) == 8 * 21    # int(7 * round(2.51)) = 21
    # One labeled image is valid; 256/1 is exact, so a changed constant or bound shows.
    assert per_class_quota("cityscapes", 1, 1, 19) == 256
    assert per_class_quota("pascal_voc", 1, 1, 21) == 1792        # int(7 * 256)
    assert per_class_quota("pascal", 14, 212, 21) == 98           # the release's second name for VOC
    with pytest.raises(UserError, match="labeled_samples"):
        per_class_quota("cityscapes", 5, 0, 19)


def test_new_bank_shape_defaults_and_bounds():
    """Defaults 256 x 256 per class, float32 whatever torch's default dtype, counts int64 zero; a size of 1 in
    each dimension is valid and 0 in any one is refused with the three values named."""
    bank = MemoryBank(3)
    assert bank.memory.shape == (3, 256, 256) and bank.counts.tolist() == [0, 0, 0]
    assert bank.counts.dtype == torch.int64 and not bank.memory.any()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert MemoryBank(1, size=1, dim=1).memory.dtype == torch.float32
    finally:
        torch.set_default_dtype(old)
    for bad in [(0, 2, 2), (2, 0, 2), (2, 2, 0)]:
        with pytest.raises(UserError) as err:
            MemoryBank(*bad)
        assert str(err.value) == f"memory bank needs num_classes, size and dim >= 1, got {bad[0]}, {bad[1]}, {bad[2]}"


def test_load_state_dict_accepts_a_full_class_zeroes_unused_slots_and_names_bad_states():
    """A class at exactly `size` vectors is valid; slots from each class's count on are zeroed (`add` relies on
    it), the slot at index == count included; wrong keys, a non-dict and counts out of [0, size] are named."""
    bank = MemoryBank(num_classes=2, size=3, dim=2)
    stored = torch.arange(1.0, 13.0).reshape(2, 3, 2)                    # no zeros anywhere: garbage beyond counts
    bank.load_state_dict({"memory": stored, "counts": torch.tensor([3, 1])})
    assert bank.counts.tolist() == [3, 1]
    expected = stored.clone()
    expected[1, 1:] = 0.0                                                # class 1 keeps its first vector only
    assert torch.equal(bank.memory, expected)
    with pytest.raises(UserError, match=r"exactly 'memory' and 'counts', got \['counts', 'extra', 'memory'\]$"):
        bank.load_state_dict({"memory": stored, "counts": torch.tensor([3, 1]), "extra": 0})
    with pytest.raises(UserError, match=r"exactly 'memory' and 'counts', got list$"):
        bank.load_state_dict([stored])
    with pytest.raises(UserError, match=r"counts must lie in \[0, 3\]"):
        bank.load_state_dict({"memory": stored, "counts": torch.tensor([4, 0])})
