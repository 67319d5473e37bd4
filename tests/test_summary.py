"""The summary table carries tokens and the convergence verdict, and marks unconverged rows."""

from __future__ import annotations

from hidden_signatures import io
from hidden_signatures.analysis import summary


def metrics(pair: str, point: str, seed: int, converged: bool, tokens: int, gain: float | None = 0.001) -> dict:
    return {"pair": pair, "relationship": "sanity", "layer": "middle", "point": point, "seed": seed,
            "architecture": "relu_l1", "sharedness": 0.9, "alignment": 0.8, "explained_variance": {"A": 0.8, "B": 0.7},
            "l0": 64.0, "dead_fraction": 0.02, "tokens": tokens, "converged": converged, "ev_window_gain": gain}


def test_unconverged_rows_are_marked_and_seeds_must_all_converge(tmp_path) -> None:
    for pair, point, seed, conv, tokens, gain in (("p", "middle", 0, True, 400_000, 0.004),
                                                  ("p", "middle-seed1", 1, False, 600_000, 0.032),
                                                  ("q", "middle", 0, True, 300_000, -0.002)):
        io.write_json(tmp_path / pair / point / "metrics.json", metrics(pair, point, seed, conv, tokens, gain))
    frame = summary.collect(tmp_path)
    by_pair = {r.pair: r for r in frame.itertuples(index=False)}
    assert by_pair["p"].converged is False and by_pair["p"].tokens == 500_000
    assert by_pair["q"].converged is True
    table = summary.markdown_table(frame)
    p_line, q_line = (next(line for line in table.splitlines() if line.startswith(f"| {n} ")) for n in "pq")
    assert "| 0.50M † +0.018 |" in p_line and "| 0.30M |" in q_line and "†" not in q_line  # the seeds' mean gain
    assert "did not converge" in table


def _point(pair: str, point: str, layer: str, seed: int, sharedness: float, alignment: float) -> dict:
    return {**metrics(pair, point, seed, True, 100_000), "layer": layer, "sharedness": sharedness,
            "alignment": alignment, "cka": 0.5}


def test_compare_pairs_uses_the_pairs_own_seed_floor_and_says_which_differ(tmp_path) -> None:
    points = [("kl", "middle", "middle", 0, 0.80, 0.60), ("kl", "middle-seed1", "middle", 1, 0.82, 0.61),
              ("jac", "middle", "middle", 0, 0.90, 0.605), ("jac", "middle-seed1", "middle", 1, 0.90, 0.615),
              ("kl", "last", "last", 0, 0.70, 0.50), ("jac", "last", "last", 0, 0.71, 0.60)]
    for pair, point, layer, seed, shared, align in points:
        io.write_json(tmp_path / pair / point / "metrics.json", _point(pair, point, layer, seed, shared, align))
    table = summary.compare_pairs(summary.collect(tmp_path), "kl", "jac", metrics=("sharedness", "alignment"))
    got = {(r["layer"], r["metric"]): r for r in table.to_dict("records")}
    middle_s, middle_a = got[("middle", "sharedness")], got[("middle", "alignment")]
    assert middle_s["verdict"] == "differ" and abs(middle_s["kl"] - 0.81) < 1e-9  # 0.09 apart, floor 0.014
    assert middle_a["verdict"] == "within seed noise"  # 0.005 apart, floor 0.007
    assert middle_a["floor from"] == "these pairs' seeds"
    last_a = got[("last", "alignment")]  # no seeds at the last layer: the table's largest alignment spread, 0.007
    assert last_a["floor from"] == "whole table" and last_a["verdict"] == "differ"
    assert got[("last", "sharedness")]["verdict"] == "within seed noise"  # 0.01 apart, floor 0.014
    cka = summary.compare_pairs(summary.collect(tmp_path), "kl", "jac", metrics=("cka",)).to_dict("records")
    assert {r["verdict"] for r in cka} == {"no seed floor"} and cka[0]["floor from"].startswith("none")


def test_a_thin_own_floor_is_raised_to_the_tables_pooled_spread(tmp_path) -> None:
    """Two seeds that agree by chance must not make a small difference 'differ': the floor is at
    least the seed spread pooled over the table (here a noisy third pair's)."""
    points = [("kl", "middle", "middle", 0, 0.80, 0.600), ("kl", "middle-seed1", "middle", 1, 0.80, 0.6001),
              ("jac", "middle", "middle", 0, 0.80, 0.610), ("jac", "middle-seed1", "middle", 1, 0.80, 0.6101),
              ("noisy", "middle", "middle", 0, 0.80, 0.60), ("noisy", "middle-seed1", "middle", 1, 0.80, 0.62)]
    for pair, point, layer, seed, shared, align in points:
        io.write_json(tmp_path / pair / point / "metrics.json", _point(pair, point, layer, seed, shared, align))
    frame = summary.collect(tmp_path)
    pooled = summary.pooled_seed_spread(frame)["alignment"]  # spreads 0.00007, 0.00007, 0.01414 -> ~0.0082
    assert abs(pooled - ((2 * 0.0001 ** 2 / 2 + 0.02 ** 2 / 2) / 3) ** 0.5) < 1e-9
    middle_a = next(r for r in summary.compare_pairs(frame, "kl", "jac", metrics=("alignment",)).to_dict("records")
                    if r["layer"] == "middle")
    assert middle_a["floor from"] == "whole table, pooled" and abs(middle_a["seed floor"] - pooled) < 1e-12
    assert middle_a["verdict"] == "within seed noise"  # 0.010 apart: over 2 x 0.00007, under 2 x 0.0082
