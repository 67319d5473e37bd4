"""The summary table carries tokens and the convergence verdict, and marks unconverged rows."""

from __future__ import annotations

from hidden_signatures import io
from hidden_signatures.analysis import summary


def metrics(pair: str, point: str, seed: int, converged: bool, tokens: int) -> dict:
    return {"pair": pair, "relationship": "sanity", "layer": "middle", "point": point, "seed": seed,
            "architecture": "relu_l1", "sharedness": 0.9, "alignment": 0.8, "explained_variance": {"A": 0.8, "B": 0.7},
            "l0": 64.0, "dead_fraction": 0.02, "tokens": tokens, "converged": converged}


def test_unconverged_rows_are_marked_and_seeds_must_all_converge(tmp_path) -> None:
    for pair, point, seed, conv, tokens in (("p", "middle", 0, True, 400_000), ("p", "middle-seed1", 1, False, 600_000),
                                            ("q", "middle", 0, True, 300_000)):
        io.write_json(tmp_path / pair / point / "metrics.json", metrics(pair, point, seed, conv, tokens))
    frame = summary.collect(tmp_path)
    by_pair = {r.pair: r for r in frame.itertuples(index=False)}
    assert by_pair["p"].converged is False and by_pair["p"].tokens == 500_000
    assert by_pair["q"].converged is True
    table = summary.markdown_table(frame)
    p_line, q_line = (next(line for line in table.splitlines() if line.startswith(f"| {n} ")) for n in "pq")
    assert "0.50M †" in p_line and "0.30M |" in q_line and "†" not in q_line
    assert "did not converge" in table
