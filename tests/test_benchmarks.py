"""The benchmark harness's own logic: RESULTS.md merging, peak selection, FLOP count (no timing here)."""

import pytest

from benchmarks import clt_step, optimizer_step, report, run
from benchmarks.common import sae_step_flops_per_token, summarize
from gemma_scope.training.grid import Stack


def test_merge_keeps_sections_written_by_others():
    other = "## Gemma forward (CPU)\n\n| tokens/s | 123 |\n"
    first = report.merge_block(other, "# Benchmarks\nold numbers\n")
    assert first.startswith(report.BEGIN)
    assert first.endswith(other)
    head = "intro written by hand\n\n"
    second = report.merge_block(head + first, "# Benchmarks\nnew numbers\n")
    assert second.startswith(head)
    assert "new numbers" in second and "old numbers" not in second
    assert second.endswith(other)
    assert second.count(report.BEGIN) == 1 and second.count(report.END) == 1


def test_merge_into_empty_file_is_just_the_block():
    assert report.merge_block("", "x") == f"{report.BEGIN}\nx\n{report.END}\n"


@pytest.mark.parametrize("broken", [report.BEGIN + "\nx\n", "x\n" + report.END, report.END + "\n" + report.BEGIN])
def test_merge_rejects_broken_markers(broken):
    with pytest.raises(ValueError, match="broken generated block"):
        report.merge_block(broken, "y")


def test_peak_is_best_backend_per_dtype_and_best_run_per_backend():
    before = {"matmul": {"numpy_float32": {"gflops": 150.0}, "jax_float32": {"gflops": 190.0},
                         "jax_bfloat16": {"gflops": 300.0}}, "max_rss_gib": 1.0}
    after = {"matmul": {"numpy_float32": {"gflops": 210.0}, "jax_float32": {"gflops": 180.0}}}
    best = run._best_of(before, after, {"error": "peak worker failed"})
    assert best["numpy_float32"]["gflops"] == 210.0 and best["jax_float32"]["gflops"] == 190.0
    assert run._peaks(best | {"torch_bfloat16": {"gflops": 385.0}}) == {"float32": 210.0, "bfloat16": 385.0}


def test_repeated_step_runs_keep_the_fastest_median_per_shape():
    def entry(dtype, median):
        return {"d_model": 640, "width": 4096, "batch": 4096, "dtype": dtype, "median_s": median}
    first = {"sae_step": [entry("float32", 0.5), entry("bfloat16", 0.2)], "max_rss_gib": 2.0,
             "matmul": {"torch_float32": {"gflops": 150.0}}, "versions": {"torch": "2.13.0"}}
    second = {"sae_step": [entry("float32", 0.3), entry("bfloat16", 0.4)], "max_rss_gib": 2.5,
              "matmul": {"torch_float32": {"gflops": 200.0}}}
    merged = run._fastest_steps(first, {"error": "worker crashed"}, second)
    assert {e["dtype"]: e["median_s"] for e in merged["sae_step"]} == {"float32": 0.3, "bfloat16": 0.2}
    assert merged["max_rss_gib"] == 2.5 and merged["matmul"]["torch_float32"]["gflops"] == 200.0
    assert merged["versions"] == {"torch": "2.13.0"}
    assert run._fastest_steps({"error": "a"}, {"error": "b"}) == {"error": "a"}
    assert run._fastest_steps() == {}


def test_flops_per_token_rejects_empty_shapes():
    with pytest.raises(ValueError, match="d_model=0"):
        sae_step_flops_per_token(0, 16)


def test_summarize_reports_median_and_spread():
    stats = summarize([3.0, 1.0, 2.0, 10.0])
    assert (stats["median_s"], stats["min_s"], stats["max_s"], stats["n"]) == (2.5, 1.0, 10.0, 4)


def test_worker_env_sets_one_cpu_device_and_the_allocator(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    monkeypatch.setenv("LD_PRELOAD", "/elsewhere.so")
    env = run.worker_env("/lib/tcmalloc.so")
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["LD_PRELOAD"] == "/lib/tcmalloc.so"
    assert "LD_PRELOAD" not in run.worker_env(None)


def test_targets_apply_the_issue_thresholds():
    rows = [{"d_model": 640, "width": 4096, "batch": 4096, "dtype": "float32", "time_ratio": 0.5,
             "ours": {"peak_fraction": 0.8}},
            {"d_model": 640, "width": 4096, "batch": 4096, "dtype": "bfloat16", "time_ratio": 1.1, "ours": {}},
            {"d_model": 2304, "width": 16384, "batch": 1024, "dtype": "float32"}]
    generator = {"variants": {"res_all": {"overhead": 0.03}}}
    gpu = {"sae_step": [{"width": 16384, "mfu": 0.55}, {"width": 131072, "mfu": 0.4}]}
    met = [t["met"] for t in run._targets(rows, generator, gpu)]
    # f32 1.3× (2× yes), f32 85% peak (80% no), bf16 as fast (0.91× no), shape 3 unmeasured ×2, res capture, 2 GPUs
    assert met == [True, False, False, None, None, True, True, False]


def test_accelerator_block_is_merged_beside_the_cpu_block():
    cpu = report.merge_block("", "# Benchmarks\ncpu numbers\n")
    both = report.merge_block(cpu, "# Accelerator\ngpu numbers\n", report.ACCELERATOR_MARKERS)
    again = report.merge_block(both, "# Accelerator\nnewer\n", report.ACCELERATOR_MARKERS)
    assert "cpu numbers" in again and "newer" in again and "gpu numbers" not in again
    assert report.merge_block(again, "# Benchmarks\nnew cpu\n").count(report.ACCELERATOR_MARKERS[0]) == 1


@pytest.mark.slow
def test_accelerator_benchmarks_run_on_cpu_at_tiny_shapes(tmp_path):
    from benchmarks import accelerator

    results = accelerator.main(["--tiny", "--steps", "1", "--warmup", "1", "--out-dir", str(tmp_path)])
    assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    pipeline = results["pipeline"]
    assert pipeline["preset"] == "tiny" and 0 < pipeline["model_fraction"] and 0 < pipeline["npy_fraction"]
    ideal = 1 / (1 / pipeline["forward"]["tokens_per_s"] + 1 / pipeline["step"]["tokens_per_s"])
    assert abs(pipeline["serial_ideal_tokens_per_s"] - ideal) < 1e-6 * ideal
    assert {r["width"] for r in results["gpu"]["sae_step"]} == {256, 1024}
    assert set(results["evaluation"]["passes"]) == {"clean", "spliced"}
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"# Accelerator benchmarks: {results['device']}" in text and "| model |" in text


def test_optimizer_block_shows_the_ratio_against_its_target_and_keeps_the_main_block():
    def row(grid, old, new):
        return {"grid": grid, "saes": 9, "d_model": 640, "width": 2048, "batch": 256, "ratio": new / old,
                "paired_ratio": 1.0, "cpu_ratio": 0.99,
                "old": {"median_s": old, "min_s": old - 0.01, "max_s": old + 0.01, "flops": 2e9, "bytes_accessed": 3e9,
                        "cpu_s": 1.0},
                "new": {"median_s": new, "min_s": new - 0.01, "max_s": new + 0.01, "flops": 2e9, "bytes_accessed": 3e9,
                        "cpu_s": 0.99}}
    results = {"date": "2026-12-02T03:00:00", "command": "python -m benchmarks.run --only optimizer",
               "settings": {"steps": 20, "warmup": 2}, "versions": {"jax": "0.10.2", "optax": "0.2.8"},
               "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5, "loadavg_before": "1.00 1.00 1.00",
                           "loadavg_after": "2.00 2.00 2.00"},
               "optimizer": [row("default", 0.5, 0.51), row("wide", 1.0, 1.05)]}
    main = report.merge_block("", "# Benchmarks\nmain numbers\n")
    both = report.merge_block(main, report.render_optimizer(results), report.OPTIMIZER_MARKERS)
    assert main in both  # the main block is untouched
    assert ("| default | 9 × 640 / 2048 / 256 | 0.500 (0.490–0.510) | 0.510 (0.500–0.520) | 1.020 (1.000), met | "
            "1.000 / 0.990 (0.990) | 2.00 / 2.00 | 3.000 / 3.000 |") in both
    assert "| 1.050 (1.000), **not met** |" in both
    again = report.merge_block(both, report.render_optimizer({**results, "optimizer": [row("default", 0.5, 0.4)]}),
                               report.OPTIMIZER_MARKERS)
    assert main in again and "0.800 (1.000), met" in again and "1.050" not in again


def test_optimizer_benchmark_times_both_steps_on_one_grid(monkeypatch):
    grp = Stack(sites=("res.0", "res.1"), d_model=16, width=64, l0_coefficients=(1e-3, 1e-2))
    monkeypatch.setattr(optimizer_step, "GRIDS", {"tiny": (grp, 32)})
    r = optimizer_step.bench("tiny", warmup=1, steps=3)
    assert (r["saes"], r["old"]["n"], r["new"]["n"]) == (4, 3, 3)
    assert r["ratio"] == r["new"]["median_s"] / r["old"]["median_s"]
    # The same step but for the optimizer: XLA counts the same work to within the few elementwise ops per param.
    assert r["new"]["flops"] == pytest.approx(r["old"]["flops"], rel=0.02) and r["old"]["flops"] > 0


def test_clt_benchmark_times_both_steps_and_its_block_keeps_the_main_block(tmp_path, monkeypatch):
    assert clt_step.flops_per_token(18, 640, 128, True) / clt_step.flops_per_token(18, 640, 128, False) == 21 / 4
    monkeypatch.setattr(clt_step, "N_LAYERS", 3)
    monkeypatch.setattr(clt_step, "D_MODEL", 8)
    monkeypatch.setattr(clt_step, "BATCH", 16)
    r = clt_step.bench(4, warmup=1, steps=2)
    assert (r["clt"]["n"], r["transcoders"]["n"]) == (2, 2)
    assert r["ratio"] == r["clt"]["median_s"] / r["transcoders"]["median_s"]
    # The CLT's decoder holds n² blocks (the unused as zeros) against n: more state, more XLA FLOPs.
    assert r["clt"]["state_bytes"] > r["transcoders"]["state_bytes"] and r["clt"]["xla_flops_per_token"] > \
        r["transcoders"]["xla_flops_per_token"] > 0
    (tmp_path / "RESULTS.md").write_text(report.merge_block("", "# Benchmarks\nmain numbers\n"))
    clt_step.write(tmp_path, {"clt": [r], "date": "2026-12-02", "command": "python -m benchmarks.run --only clt"})
    text = (tmp_path / "RESULTS.md").read_text()
    assert "main numbers" in text and "| 4 | " in text and "# Cross-layer transcoder step" in text


def test_attribution_block_lists_each_prompt_length_and_keeps_the_other_blocks():
    machine = {"cpu": "EPYC", "cores": 2, "memory_gib": 23.5, "loadavg_before": "1.00", "loadavg_after": "1.50"}
    row = {"tokens": 16, "transcoders": "random", "active_latents": 480, "attributed": 400, "nodes": 713,
           "max_rss_gib": 3.1, "seconds": {"prepare": 5.04, "edges": 20.0, "prune": 0.5}, "total_s": 25.54,
           "cpu_seconds": {"prepare": 6.0, "edges": 30.0, "prune": 0.4}, "total_cpu_s": 36.4,
           "sweep": {"gflops": 41.3, "fraction_of_matmul": 0.584}}
    results = {"date": "2026-12-02T06:00:00", "command": "python -m benchmarks.run --only attribution",
               "machine": machine, "versions": {"jax": "0.10.2"}, "rows": [row, {"error": "ran past 600 s"}]}
    block = report.render_attribution(results)
    assert "| 16 | random | 480 | 400 | 713 | 5.0 / 6.0 | 20.0 / 30.0 | 0.5 / 0.4 | 25.5 / 36.4 | 41.3 | 0.58 | 3.10 |" \
        in block
    assert "| – | ran past 600 s |" in block
    main = report.merge_block("", "main numbers")
    both = report.merge_block(main, block, report.ATTRIBUTION_MARKERS)
    assert main in both and both.count(report.ATTRIBUTION_MARKERS[0]) == 1
    assert "attribution" in run.PARTS

def test_quality_pairs_each_saelens_sae_with_ours_at_its_site_and_target():
    from benchmarks import quality

    def rec(row, site, target, dl, fvu):
        return {"row": row, "site": site, "target_l0": target, "delta_lm_loss": sum(dl) / 2, "fvu": sum(fvu) / 2,
                "halves": {"delta_lm_loss": dl, "fvu": fvu}}

    results = quality.paired_changes([rec("ours", "res.4", 50, [0.4, 0.6], [0.2, 0.2]),
                                      rec("SAELens", "res.4", 50, [1.0, 1.4], [0.5, 0.3]),
                                      rec("SAELens", "res.8", 50, [1.0, 1.0], [0.1, 0.1])])
    theirs = results[1]
    # changes per half: +0.6 and +0.8 nats → mean +0.7, noise half their difference 0.1
    assert abs(theirs["delta_lm_loss_vs_ours"] - 0.7) < 1e-12 and abs(theirs["delta_lm_loss_vs_ours_noise"] - 0.1) < 1e-12
    assert abs(theirs["fvu_vs_ours"] - 0.2) < 1e-12 and abs(theirs["fvu_vs_ours_noise"] - 0.1) < 1e-12
    assert "delta_lm_loss_vs_ours" not in results[0] and "delta_lm_loss_vs_ours" not in results[2]  # no pair
