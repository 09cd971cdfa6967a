import pytest

from ubsmoe.data.multiple_choice import MultipleChoice
from ubsmoe.data.partition import example_labels, label_histograms, mean_max_label_share, partition

LABELS = [(task, answer) for task in ("boolq", "piqa", "siqa", "arc") for answer in range(2) for _ in range(50)]


def _check_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_iid_sizes_and_cover():
    for n, k in [(400, 7), (10, 10), (11, 3)]:
        parts = partition(LABELS[:n], k, "iid", seed=1)
        _check_cover(parts, n)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and len(parts) == k


def test_deterministic_per_seed():
    for scheme in ("iid", "dirichlet"):
        a = partition(LABELS, 8, scheme, alpha=0.5, seed=5)
        assert a == partition(LABELS, 8, scheme, alpha=0.5, seed=5)
        assert a != partition(LABELS, 8, scheme, alpha=0.5, seed=6)


def test_dirichlet_skew_depends_on_alpha():
    skewed = [mean_max_label_share(LABELS, partition(LABELS, 10, "dirichlet", alpha=0.1, seed=s)) for s in range(5)]
    flat = [mean_max_label_share(LABELS, partition(LABELS, 10, "dirichlet", alpha=100, seed=s)) for s in range(5)]
    iid = mean_max_label_share(LABELS, partition(LABELS, 10, "iid", seed=0))
    assert sum(skewed) / 5 > 0.5 > 0.3 > sum(flat) / 5
    assert iid < 0.3  # 8 labels evenly spread: about 1/8 each


def test_dirichlet_cover_and_min_per_client():
    for alpha in (0.01, 0.1, 1.0):
        for seed in range(3):
            parts = partition(LABELS, 20, "dirichlet", alpha=alpha, seed=seed, min_per_client=5)
            _check_cover(parts, len(LABELS))
            assert min(len(p) for p in parts) >= 5


def test_rebalance_when_redraws_do_not_suffice():
    labels = ["a"] * 30 + ["b"] * 2
    parts = partition(labels, 8, "dirichlet", alpha=0.01, seed=0, min_per_client=4, max_redraws=0)
    _check_cover(parts, 32)
    assert [len(p) for p in parts] == [4] * 8


def test_too_many_clients_and_bad_arguments():
    with pytest.raises(ValueError, match="cannot give each of 11 clients at least 1 example"):
        partition(list(range(10)), 11)
    with pytest.raises(ValueError, match="cannot give each of 4 clients at least 3"):
        partition(list(range(10)), 4, "dirichlet", min_per_client=3)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(list(range(10)), 2, "shards")
    with pytest.raises(ValueError, match="alpha"):
        partition(list(range(10)), 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition(list(range(10)), 0)


def test_histograms_and_labels_of_examples():
    examples = [MultipleChoice("q", ("a", "b"), i % 2, "t1" if i < 4 else "t2") for i in range(6)]
    labels = example_labels(examples)
    assert labels == [("t1", 0), ("t1", 1), ("t1", 0), ("t1", 1), ("t2", 0), ("t2", 1)]
    assert example_labels(examples, key=lambda e: e.task)[-1] == "t2"
    histograms = label_histograms(labels, [[0, 2, 5], [1, 3, 4]])
    assert histograms == [{("t1", 0): 2, ("t2", 1): 1}, {("t1", 1): 2, ("t2", 0): 1}]
    parts = partition(labels, 3, "dirichlet", seed=0)
    assert sum(sum(h.values()) for h in label_histograms(labels, parts)) == 6
