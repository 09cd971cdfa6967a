import math
import struct

import pytest

from ubsmoe.report.plots import plot_utilization_heatmaps, spread_rounds, write_plots

NAMES = [
    "accuracy_by_round.png",
    "utilization_heatmap.png",
    "balance_by_round.png",
    "compute_vs_accuracy.png",
    "train_loss_by_round.png",
]
TIERS = [(0.25, 2, None), (0.5, 4, None), (1.0, None, 4)]  # (budget, top_k, rank); the last tier is low-rank


def eval_block(shift):
    tiers = [
        {"tier": i, "top_k": k, "budget": b, "accuracy": 0.4 + 0.05 * i + shift, "ci95": 0.05, "per_task": {}}
        for i, (b, k, _) in enumerate(TIERS)
    ]
    return {"tiers": tiers, "mean_accuracy": 0.45 + shift, "mean_ci95": 0.03}


def make_summary(n_rounds=4, layers=3, experts=8, eval_every=2):
    clients = [{"client_id": c, "tier": c % 3, "budget": TIERS[c % 3][0], "top_k": TIERS[c % 3][1]} for c in range(6)]
    rounds = []
    for r in range(n_rounds):
        util = [[((r + 1) * (l + 1) * (e + 1)) % 7 / 7 for e in range(experts)] for l in range(layers)]
        rounds.append(
            {
                "round": r,
                "mean_utilization_cv": 0.8 * 0.8**r,
                "dead_experts": [0, max(0, 2 - r), 0],
                "utilization": util,
                "train": {"train_lm_loss": 2.0 - 0.1 * r},
                "client_metrics": [
                    {
                        "client_id": c["client_id"],
                        "top_k": c["top_k"],
                        "accepted": True,
                        "train_lm_loss": 2.1 - 0.1 * r + 0.05 * c["tier"],
                    }
                    for c in clients
                ],
                "eval": eval_block(0.02 * r) if (r + 1) % eval_every == 0 else {},
            }
        )
    final_tiers = [
        {
            "tier": i,
            "budget": b,
            "top_k": k,
            "rank": rank,
            "accuracy": {"mean": 0.5 + 0.05 * i, "ci95": 0.04, "per_task": {"social_iqa": {"accuracy": 0.4}}},
            "flops_per_sample": {"analytic": (i + 1) * 1.5e9, "measured": (i + 1) * 1.4e9},
        }
        for i, (b, k, rank) in enumerate(TIERS)
    ]
    return {
        "method": "ubsmoe",
        "evaluation": {"protocol": "loglik", "chance": 0.41},
        "tiers": final_tiers,
        "initial": eval_block(0.0),
        "rounds": rounds,
        "data": {"clients": clients},
    }


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first in every PNG
    return width, height


def test_write_plots_draws_all_five(tmp_path):
    out = tmp_path / "plots"
    paths = write_plots(make_summary(), out)
    assert [p.name for p in paths] == NAMES
    for path in paths:
        assert path.parent == out
        width, height = png_size(path)
        assert 300 < width < 3000 and 300 < height < 3000
    try:
        from PIL import Image
    except ImportError:
        return
    for path in paths:
        with Image.open(path) as image:
            image.verify()


def test_empty_summary_draws_nothing(tmp_path):
    assert write_plots({}, tmp_path / "a") == []
    assert write_plots({"method": "ubsmoe", "rounds": [], "tiers": [], "initial": {}}, tmp_path / "b") == []


def test_no_eval_still_draws_balance_plots(tmp_path):
    summary = make_summary()
    del summary["initial"], summary["tiers"]
    for rnd in summary["rounds"]:
        rnd.pop("eval")
    names = [p.name for p in write_plots(summary, tmp_path)]
    assert "utilization_heatmap.png" in names and "balance_by_round.png" in names
    assert "accuracy_by_round.png" not in names and "compute_vs_accuracy.png" not in names


def test_nan_and_none_values_are_skipped(tmp_path):
    summary = make_summary()
    summary["initial"]["tiers"][0]["accuracy"] = math.nan
    summary["initial"]["tiers"][1]["ci95"] = None
    summary["rounds"][1]["eval"]["tiers"][2]["accuracy"] = None
    summary["rounds"][1]["eval"]["mean_accuracy"] = math.nan
    summary["tiers"][0]["accuracy"]["mean"] = math.nan
    summary["tiers"][1]["accuracy"]["ci95"] = None
    summary["rounds"][0]["mean_utilization_cv"] = math.nan
    summary["rounds"][2]["utilization"][0][0] = math.nan
    summary["rounds"][3]["train"]["train_lm_loss"] = math.inf
    assert [p.name for p in write_plots(summary, tmp_path)] == NAMES


def test_malformed_fields_do_not_raise(tmp_path):
    summary = {
        "method": "ubsmoe",
        "tiers": [None, {"accuracy": 0.5}],
        "initial": {"tiers": "oops"},
        "rounds": [{"utilization": [[0.1, 0.2], [0.3]], "dead_experts": 3, "eval": None}, "junk"],
        "data": {"clients": None},
    }
    assert write_plots(summary, tmp_path) == []


@pytest.mark.parametrize(
    ("n", "at_most", "expected"),
    [(0, 6, []), (1, 6, [0]), (3, 6, [0, 1, 2]), (6, 6, list(range(6))), (7, 3, [0, 3, 6]), (5, 1, [4])],
)
def test_spread_rounds_small_cases(n, at_most, expected):
    assert spread_rounds(n, at_most) == expected


@pytest.mark.parametrize("n", [7, 10, 11, 50, 101])
def test_spread_rounds_keeps_ends_and_is_distinct(n):
    picks = spread_rounds(n)
    assert len(picks) == 6 and picks == sorted(set(picks))
    assert picks[0] == 0 and picks[-1] == n - 1


def test_heatmap_with_many_rounds(tmp_path):
    summary = make_summary(n_rounds=10)
    path = plot_utilization_heatmaps(summary, tmp_path / "heat.png")
    assert path is not None and png_size(path)[0] > 300
