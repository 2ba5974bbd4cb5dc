"""The metrics log: TensorBoard event files hold exactly the values of metrics.jsonl (read with TensorBoard's own
reader), one series per SAE and metric."""

import importlib.util
import json
import pathlib

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gemma_scope import train
from gemma_scope.training import log

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("from_activations", ROOT / "experiments/from_activations.py")
from_activations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(from_activations)


def test_event_files_equal_the_jsonl_records(tmp_path, make_npy_dir):
    config = from_activations.get_config()
    config.workdir, config.data.path = str(tmp_path / "run"), str(make_npy_dir())
    config.sae.width, config.sae.l0_coefficient = 32, (3e-4, 1e-2)
    config.train.update(steps=4, batch_size=32, log_every=2, checkpoint_every=4, norm_batches=2, eval_batches=2)
    train.run(config)
    records = [json.loads(line) for line in (tmp_path / "run" / log.METRICS_FILE).read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "custom/lambda_0.0003/l0" in tags and "custom/lambda_0.01/fvu" in tags and "learning_rate" in tags
    per_sae = ("loss", "mse", "fvu", "l0", "dead_fraction", "lambda_now")
    assert len(tags) == 2 * len(per_sae) + 2
    assert [r["step"] for r in records] == [2, 2, 4, 4]
    for r in records:
        for key in per_sae:
            tag = log.tensorboard_tag(r["site"], r["l0_coefficient"], r["target_l0"], key)
            (event,) = [e for e in events.Scalars(tag) if e.step == r["step"]]
            assert event.value == pytest.approx(r[key], rel=1e-6, abs=1e-12)
        (lr,) = [e for e in events.Scalars("learning_rate") if e.step == r["step"]]
        assert lr.value == pytest.approx(r["learning_rate"], rel=1e-6)
