"""The linear-algebra probe: rows for every method, agreement with eigh, the budget, the
per-bucket choice of ``auto`` and its cache."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kfacbench.optim import linalg_probe
from kfacbench.optim.inverses import METHODS
from kfacbench.optim.linalg_probe import Shape, choose, fastest, probe, refresh_shapes, slow_eigh

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KFACBENCH_CACHE", str(tmp_path))
    return tmp_path


def row(method: str, ms: float, agrees: bool = True, **kw: Any) -> dict[str, Any]:
    base = {"size": 8, "batch": 2, "dtype": "float32", "method": method, "ms": ms}
    return base | {"status": "measured", "agrees": agrees} | kw


def test_probe_times_and_checks_every_method_at_every_shape() -> None:
    rows = probe([Shape(8, 2), Shape(16, 1)], CPU, budget_s=60)
    assert len(rows) == 2 * 2 * len(METHODS)
    for r in rows:
        assert r["status"] == "measured", r
        assert r["ms"] > 0 and r["ms_per_matrix"] == pytest.approx(r["ms"] / r["batch"])
        assert r["agrees"], r  # well-conditioned matrices: every method is as good as eigh
        assert r["rel_error"] < (1e-4 if r["dtype"] == "float32" else 1e-10)
        assert r["eigh_over_cholesky"] > 0
        assert "torch" in r["build"]


def test_probe_out_of_budget_leaves_rows_saying_so() -> None:
    rows = probe([Shape(8, 1)], CPU, dtypes=("float32",), budget_s=0.0)
    assert [r["status"] for r in rows] == ["budget"] * len(METHODS)


def test_fastest_takes_the_quickest_method_that_agrees() -> None:
    rows = [row("eigh", 3.0), row("cholesky", 1.0), row("inv", 0.5, agrees=False)]
    assert fastest(rows, Shape(8, 2), "float32") == "cholesky"
    assert fastest(rows, Shape(8, 3), "float32") is None
    assert fastest([row("newton", 0.1, status="budget")], Shape(8, 2), "float32") is None


def test_slow_eigh_flags_each_shape_once() -> None:
    slow = [row(m, 1.0, eigh_over_cholesky=37.0, eigh_slow=True) for m in METHODS]
    fine = [row(m, 1.0, size=4, eigh_over_cholesky=2.0, eigh_slow=False) for m in METHODS]
    assert slow_eigh(slow + fine) == ["eigh 37× slower than Cholesky at 2×8² float32"]


def test_refresh_shapes_are_the_size_buckets() -> None:
    sizes = [785, 1000, 1000, 500, 501, 250, 30]
    assert refresh_shapes(sizes, math.sqrt(2)) == [
        Shape(1000, 3),  # 785·√2 ≥ 1000
        Shape(501, 2),
        Shape(250, 1),
        Shape(30, 1),
    ]
    assert refresh_shapes(sizes, 1.0) == [  # a CPU: equal sizes only
        Shape(1000, 2),
        Shape(785, 1),
        Shape(501, 1),
        Shape(500, 1),
        Shape(250, 1),
        Shape(30, 1),
    ]


def test_choose_probes_once_then_reads_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = [Shape(12, 2), Shape(5, 1)]
    first = choose(shapes, CPU)
    assert all(m in METHODS for m in first)
    files = list((cache / "linalg").glob("*.json"))
    assert len(files) == 1 and "torch" in files[0].name

    def no_probe(*args: object, **kwargs: object) -> list[dict[str, Any]]:
        raise AssertionError("probed a cached shape")

    monkeypatch.setattr(linalg_probe, "probe", no_probe)
    assert choose(shapes, CPU) == first


def test_choose_never_picks_a_disagreeing_method(cache: Path) -> None:
    rows = [row("eigh", 3.0), row("cholesky", 2.0), row("inv", 0.5, agrees=False)]
    rows.append(row("newton", 0.1, agrees=False))
    linalg_probe.save_cache(CPU, rows)
    assert choose([Shape(8, 2)], CPU) == ["cholesky"]
    linalg_probe.save_cache(CPU, [r | {"agrees": False} for r in rows])
    assert choose([Shape(8, 2)], CPU) == ["eigh"]  # nothing agrees: the reference


def test_a_damaged_or_outdated_cache_is_probed_again(cache: Path) -> None:
    path = linalg_probe.save_cache(CPU, [row("inv", 0.5)])
    path.write_text("{not json")
    assert linalg_probe.load_cache(CPU) == []
    path.write_text(json.dumps({"version": -1, "rows": [row("inv", 0.5)]}))
    assert linalg_probe.load_cache(CPU) == []
    assert choose([Shape(8, 2)], CPU)[0] in METHODS
    assert linalg_probe.load_cache(CPU)[0]["build"]


def test_newton_schulz_agrees_at_a_float32_refresh_size() -> None:
    """At n = 64 the probe's Newton-Schulz result is within the eigh-relative tolerance."""
    rows = probe([Shape(64, 1)], CPU, dtypes=("float32",), budget_s=60)
    newton = next(r for r in rows if r["method"] == "newton")
    assert newton["agrees"] and math.isfinite(newton["rel_error"])
