"""C_peak profiling: the knee on synthetic curves, the cache, the plot, one real tiny sweep, the CLI."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_tiny_qwen2

from fastgrpo.rollout import profile as prof
from fastgrpo.rollout.hf_runner import HFTargetRunner
from fastgrpo.rollout.profile import (
    default_token_grid,
    find_knee,
    knee_details,
    load_or_profile,
    measure_forward_latency,
    profile_c_peak,
    resolve_c_peak,
    split_tokens,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def roofline(t: int, knee: int = 128, rate: float = 1000.0) -> float:
    """Latency flat (memory-bound) up to the knee, then linear: throughput saturates at the knee."""
    latency = max(knee, t) / rate
    return t / latency


def test_knee_on_a_clean_roofline():
    pts = [(t, roofline(t)) for t in GRID]
    assert find_knee(pts) == 128
    info = knee_details(pts)
    assert info["saturated"] and info["peak_throughput_tok_s"] == pytest.approx(1000.0)
    # A softer curve, throughput = 1e4 * t / (t + 16): the peak (at 1024) is 9846; 95% of it is
    # 9354, first reached at 256 (9412; 128 gives 8889). Half of it (4923) at 16 (5000).
    soft = [(t, 1e4 * t / (t + 16)) for t in GRID]
    assert find_knee(soft) == 256
    assert find_knee(soft, frac=0.5) == 16
    # The dict form (as measured) and duplicates (several decompositions: keep the best) work too.
    dicts = [{"tokens": t, "throughput_tok_s": roofline(t)} for t in GRID]
    dicts.append({"tokens": 64, "throughput_tok_s": 1.0})
    assert find_knee(dicts) == 128


def test_knee_is_robust_to_noise():
    # Noisy flat tail (+-2%) after a knee at 64 plus one lucky spike far above the plateau: the
    # spike must not define the peak (unsmoothed, 95% of 1600 is never reached again: knee 256).
    for seed in range(20):
        rng = random.Random(seed)
        pts = [(t, roofline(t, knee=64) * (1 + rng.uniform(-0.02, 0.02))) for t in GRID]
        pts[8] = (256, 1600.0)
        assert find_knee(pts) == 64, seed
    # A lucky spike below the knee (8 tokens timed during a quiet moment) is not taken as the knee.
    pts = [(t, roofline(t, knee=64)) for t in GRID]
    pts[3] = (8, 1200.0)
    assert find_knee(pts) == 64
    # Dips on the plateau (a busy neighbour during those points) change nothing.
    pts = [(t, roofline(t, knee=64)) for t in GRID]
    pts[7], pts[9] = (128, 600.0), (512, 400.0)
    assert find_knee(pts) == 64
    # Throughput still rising at the end: the knee is the last point and it says so.
    rising = [(t, float(t)) for t in GRID]
    info = knee_details(rising)
    assert info["c_peak"] == 1024 and not info["saturated"]
    # Degenerate curves still give an answer: one point; throughput falling from the first point.
    assert find_knee([(8, 5.0)]) == 8
    assert find_knee([(1, 100.0), (2, 10.0), (4, 5.0)]) == 1
    with pytest.raises(ValueError):
        find_knee([])


def test_token_grid_and_split():
    assert default_token_grid(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    for t in default_token_grid(4096):
        rows, tree = split_tokens(t)
        assert rows * tree == t and rows <= max(8, t // 64) and tree <= 64
    assert split_tokens(3) == (3, 1) and split_tokens(40) == (8, 5) and split_tokens(1024) == (16, 64)


def _fake_points(knee=96):
    return [{"tokens": t, "rows": min(t, 8), "tree_tokens": max(1, t // 8), "prefix_len": 64,
             "latency_ms": 1e3 * t / roofline(t, knee), "latency_ms_min": 0.0, "latency_ms_max": 0.0,
             "throughput_tok_s": roofline(t, knee)} for t in default_token_grid(1024)]


@pytest.fixture()
def counted(monkeypatch):
    calls = []

    def fake(runner_factory, grid, *args, **kwargs):
        calls.append(list(grid))
        return _fake_points()

    monkeypatch.setattr(prof, "measure_forward_latency", fake)
    return calls


def test_cache_hit_miss_force_and_contents(tmp_path, counted, tiny_qwen2):
    cache = tmp_path / "c_peak"
    first = load_or_profile(tiny_qwen2, cache, model_name="tiny-test")
    assert (first.c_peak, first.cached, len(counted)) == (96, False, 1)
    data = json.loads(first.path.read_text())
    assert data["c_peak"] == 96 and data["format"] == prof.CACHE_FORMAT
    key = data["key"]
    assert data["info"]["model"] == "tiny-test" and key["dtype"] == "float32" and key["layout"] == "single"
    assert key["shape"]["hidden_size"] == 64 and key["shape"]["intermediate_size"] == 128
    assert key["shape"]["head_dim"] == 16 and key["device"].startswith("cpu")
    assert data["points"] == _fake_points() and data["settings"]["prefix_len"] == 64
    assert first.png.read_bytes()[:8] == PNG_MAGIC and data["png"] == str(first.png)
    assert not list(cache.glob(".*tmp"))  # atomic writes leave nothing behind
    # Hit: no measurement.
    assert profile_c_peak(tiny_qwen2, cache, model_name="tiny-test") == 96 and len(counted) == 1
    hit = load_or_profile(tiny_qwen2, cache, model_name="tiny-test")
    assert hit.cached and hit.points == first.points
    # The name is not part of the key (the trainer and the CLI may name the model differently;
    # same shapes, same knee); another layout or dtype misses and gets its own file.
    assert profile_c_peak(tiny_qwen2, cache) == 96 and len(counted) == 1
    profile_c_peak(tiny_qwen2, cache, model_name="tiny-test", layout="tp2")
    profile_c_peak(tiny_qwen2, cache, dtype="bfloat16")
    assert len(counted) == 3 and len(list(cache.glob("*.json"))) == 3
    # force re-measures; a corrupt file is re-measured, not trusted.
    profile_c_peak(tiny_qwen2, cache, model_name="tiny-test", force=True)
    assert len(counted) == 4
    first.path.write_text("{not json")
    assert profile_c_peak(tiny_qwen2, cache, model_name="tiny-test") == 96 and len(counted) == 5
    # resolve_c_peak: the config value wins without touching anything.
    assert resolve_c_peak(200, tiny_qwen2, tmp_path / "nowhere") == 200
    assert not (tmp_path / "nowhere").exists()
    assert resolve_c_peak(None, tiny_qwen2, cache) == 96 and len(counted) == 5
    with pytest.raises(ValueError):
        resolve_c_peak(0, tiny_qwen2, cache)


def test_real_sweep_on_a_tiny_qwen2(tmp_path):
    model = make_tiny_qwen2(vocab=64)
    points = measure_forward_latency(lambda b, L: HFTargetRunner(model, b, L), [1, 8, 64, 256],
                                     prefix_len=16, warmup=1, repeats=3)
    assert [p["tokens"] for p in points] == [1, 8, 64, 256]
    assert [(p["rows"], p["tree_tokens"]) for p in points] == [(1, 1), (8, 1), (8, 8), (8, 32)]
    for p in points:
        assert p["latency_ms"] > 0 and p["latency_ms_min"] <= p["latency_ms"] <= p["latency_ms_max"]
        assert p["throughput_tok_s"] == pytest.approx(p["tokens"] / (p["latency_ms"] / 1e3))
    # Batching 256 tokens into one forward beats 1 token per forward (not a timing value).
    assert points[-1]["throughput_tok_s"] > points[0]["throughput_tok_s"]
    assert find_knee(points) in {1, 8, 64, 256}
    # Explicit batch sizes cross with the token counts.
    pts = measure_forward_latency(lambda b, L: HFTargetRunner(model, b, L), [4, 8], batch_sizes=[1, 4],
                                  prefix_len=8, warmup=0, repeats=1)
    assert [(p["rows"], p["tree_tokens"]) for p in pts] == [(1, 4), (4, 1), (1, 8), (4, 2)]


def test_cli_prints_the_table(tmp_path, capsys, monkeypatch):
    from fastgrpo.cli import profile as cli

    monkeypatch.chdir(tmp_path)  # the preset's tokenizer cache goes under the working folder

    monkeypatch.setattr(prof, "measure_forward_latency", lambda *a, **k: _fake_points())
    png = tmp_path / "plot.png"
    args = ["--model", "tiny", "--cache-dir", str(tmp_path / "c"), "--out-png", str(png), "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "C_peak = 96" in out and "measured" in out and png.read_bytes()[:8] == PNG_MAGIC
    assert cli.main(args) == 0
    assert "cached" in capsys.readouterr().out
