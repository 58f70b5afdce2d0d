"""The optimizer statistics reach TensorBoard: a run with report_to="tensorboard" writes them to
the event files under ``optim/<key>/group_<i>`` with the values the Trainer logged."""

from __future__ import annotations

import pytest
from hf_common import (  # noqa: F401 - frozen_import_heap, one_thread: autouse fixtures
    ToyLM,
    frozen_import_heap,
    one_thread,
    tiny_gpt2,
    training_kwargs,
)

import hf_optim

pytest.importorskip("tensorboard")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["casmo", "momo"])
def test_statistics_in_tensorboard_event_files(name, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "out"  # the TensorBoard callback writes under output_dir/runs/
    args = transformers.TrainingArguments(
        **training_kwargs(name, str(logs), max_steps=4, report_to="tensorboard")
    )
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=ToyLM(8))
    trainer.train()
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    expected = {f"train/optim/{key}" for key in optimizer.statistics()}
    assert expected, "the optimizer has statistics to log"

    (run,) = [path.parent for path in logs.rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert expected <= scalars
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for tag in expected:
        values = [event.value for event in events.Scalars(tag)]
        key = tag.removeprefix("train/")
        assert values == pytest.approx([entry[key] for entry in logged], rel=1e-6), tag
    assert len(values) == 4
