"""Report: Markdown table and PNG plots from evaluation records."""

import numpy as np
import pytest

from gemma_scope.evaluation import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_records(with_lm=True):
    rng = np.random.default_rng(0)
    records = []
    for site, width in (("res.6", 4096), ("res.6", 16384), ("mlp.6", 4096)):
        for lam, l0 in zip((1e-3, 3e-4, 1e-4), (20.0, 90.0, 260.0)):
            record = {"site": site, "width": width, "l0_coefficient": lam, "l0": l0 * (1 + 0.1 * (width > 4096)),
                      "fvu": 0.5 / np.sqrt(l0), "dead_fraction": 0.01, "n_tokens": 10_000,
                      "frequencies": np.where(rng.uniform(size=width) < 0.02, 0, 10 ** rng.uniform(-5, -0.5, width))}
            if with_lm:
                positions = np.arange(1, 65)
                record.update(delta_lm_loss=0.3 / np.sqrt(l0), clean_loss=3.0, zero_ablation_loss=9.0,
                              by_position={"fvu": np.r_[np.nan, 0.1 + 0.1 * np.log(positions)],
                                           "delta_lm_loss": 0.05 * np.log1p(positions[:-1].astype(float))})
            records.append(record)
    return records


def test_write_report_produces_table_and_plots(tmp_path):
    path = report.write_report(sweep_records(), tmp_path, title="Sweep", notes="Tokens seen: 10,000.")
    text = path.read_text()
    assert text.startswith("# Sweep\n\nTokens seen: 10,000.")
    rows = [line for line in text.splitlines() if line.startswith("| res.") or line.startswith("| mlp.")]
    assert len(rows) == 9
    # Canonical SAE per (site, width): L0 closest to 100.
    assert sum("★" in row for row in rows) == 3
    assert "| res.6 ★ | 4k | 0.0003 | – | 90 | 0.0527 | 0.0316 | 3 | 9 | 0.01 | 10,000 |" in rows
    for name in (report.FRONTIER_PLOT, report.POSITION_PLOT, report.FREQUENCY_PLOT):
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_report_without_lm_metrics_skips_position_plot(tmp_path):
    records = sweep_records(with_lm=False)
    text = report.write_report(records, tmp_path).read_text()
    assert report.POSITION_PLOT not in text and not (tmp_path / report.POSITION_PLOT).exists()
    assert (tmp_path / report.FRONTIER_PLOT).exists()
    assert "| – |" in text  # missing delta LM loss shown as a dash
    with pytest.raises(ValueError, match="by_position"):
        report.plot_by_position(records, tmp_path / "x.png")


def test_empty_records_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        report.write_report([], tmp_path)


def test_log_binned_position_curve_averages_each_bin():
    curve = np.r_[np.nan, np.arange(1, 1024, dtype=float)]  # value == position; BOS position NaN
    centres, means = report._log_binned(curve)
    assert centres[0] == 1 and means[0] == 1
    assert np.all(np.diff(centres) > 0) and 30 <= len(centres) <= 40
    np.testing.assert_allclose(means, centres, rtol=0.02)  # mean of positions in a bin ≈ its centre
