"""Federated partitions of example indices over clients: IID or Dirichlet(alpha) over a label.

The label of an example is by default `(task, answer index)` (see `example_labels`). Partitions use
their own seed, independent of the model seed, and are deterministic for it. Every index is given to
exactly one client, and every client gets at least `min_per_client` indices.

Dirichlet: for each label, a proportion vector p ~ Dir(alpha, ..., alpha) over the clients splits that
label's (shuffled) indices; small alpha concentrates each label on few clients (non-IID), large alpha
approaches IID. When a draw leaves a client below `min_per_client`, the partition is drawn again (up
to `max_redraws` times, from the same seeded generator), then rebalanced deterministically: the
largest client gives one index of its most frequent label to the smallest, until all have enough.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

SCHEMES = ("iid", "dirichlet")


def example_labels(examples: Sequence[Any], key: Callable[[Any], Hashable] | None = None) -> list[Hashable]:
    """Partition labels of examples: `key(example)`, by default `(example.task, example.answer)`."""
    if key is None:
        return [(example.task, example.answer) for example in examples]
    return [key(example) for example in examples]


def _check(n: int, num_clients: int, min_per_client: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if min_per_client < 0:
        raise ValueError(f"min_per_client must be non-negative, got {min_per_client}")
    if n < num_clients * min_per_client:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least {min_per_client} example(s): "
            f"only {n} example(s) (use fewer clients or a smaller min_per_client)"
        )


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(n)
    return [sorted(int(i) for i in chunk) for chunk in np.array_split(order, num_clients)]


def _label_groups(labels: Sequence[Hashable]) -> list[list[int]]:
    """Indices per distinct label, labels in order of first appearance (deterministic, no sorting needed)."""
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return list(groups.values())


def _dirichlet_draw(groups: list[list[int]], num_clients: int, alpha: float, rng: np.random.Generator):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for group in groups:
        shuffled = rng.permutation(np.asarray(group))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # underflow for tiny alpha
            shares = np.zeros(num_clients)
            shares[rng.integers(num_clients)] = 1.0
        cuts = (np.cumsum(shares)[:-1] * len(group)).round().astype(int)
        for client, chunk in enumerate(np.split(shuffled, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return parts


def _rebalance(parts: list[list[int]], labels: Sequence[Hashable], min_per_client: int) -> None:
    """Move indices from the largest client to the smallest until every client has `min_per_client`."""
    while True:
        sizes = [len(p) for p in parts]
        small = min(range(len(parts)), key=lambda c: (sizes[c], c))
        if sizes[small] >= min_per_client:
            return
        large = max(range(len(parts)), key=lambda c: (sizes[c], -c))
        counts = Counter(labels[i] for i in parts[large])
        top = max(counts.values())
        # the most frequent label of the donor (first such index), so its own label mix changes least
        position = next(k for k, i in enumerate(parts[large]) if counts[labels[i]] == top)
        parts[small].append(parts[large].pop(position))


def partition(
    labels: Sequence[Hashable],
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_client: int = 1,
    max_redraws: int = 100,
) -> list[list[int]]:
    """Indices 0..len(labels)-1 split over `num_clients` clients (each list sorted).

    scheme "iid": a seeded shuffle cut into sizes that differ by at most one (labels unused);
    "dirichlet": per-label Dirichlet(alpha) shares (see the module docstring).
    """
    n = len(labels)
    _check(n, num_clients, min_per_client)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return _iid(n, num_clients, rng)
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be a positive number, got {alpha}")
    groups = _label_groups(labels)
    parts = _dirichlet_draw(groups, num_clients, alpha, rng)
    for _ in range(max_redraws):
        if min(len(p) for p in parts) >= min_per_client:
            break
        parts = _dirichlet_draw(groups, num_clients, alpha, rng)
    _rebalance(parts, labels, min_per_client)
    return [sorted(p) for p in parts]


def label_histograms(labels: Sequence[Hashable], parts: Sequence[Sequence[int]]) -> list[dict[Hashable, int]]:
    """Each client's label counts, labels in order of first appearance in `labels`."""
    order = {label: rank for rank, label in enumerate(dict.fromkeys(labels))}
    histograms = []
    for part in parts:
        counts = Counter(labels[i] for i in part)
        histograms.append(dict(sorted(counts.items(), key=lambda item: order[item[0]])))
    return histograms


def mean_max_label_share(labels: Sequence[Hashable], parts: Sequence[Sequence[int]]) -> float:
    """Mean over non-empty clients of the share of its most frequent label (1.0: each client holds one label)."""
    shares = [max(h.values()) / sum(h.values()) for h in label_histograms(labels, parts) if h]
    return float(np.mean(shares)) if shares else 0.0
