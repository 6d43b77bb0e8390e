"""Progress events: one typed record, worded in one place for the terminal bars and the explorer's bar."""

from __future__ import annotations

import pytest

from tabconv.progress import ProgressEvent, Stage


@pytest.mark.parametrize(("event", "text", "fraction"), [
    (ProgressEvent(Stage.TABLES, 2, 21, "layer1.0.conv1"), "Building tables (3/21): layer1.0.conv1", 2 / 21),
    (ProgressEvent(Stage.EVALUATE, images=450), "Evaluating on 450 images", None),
    (ProgressEvent(Stage.FINETUNE, 8, 300, loss=0.08123, seconds_left=40.2),
     "Fine-tuning: step 8/300, loss 0.0812, about 40 s left", 8 / 300),
    (ProgressEvent(Stage.TRAIN, 1404, 1404, "epoch 3/3", loss=0.05), "Training: step 1404/1404, epoch 3/3, loss 0.0500",
     1.0),
    (ProgressEvent(Stage("decode evaluation images"), 64, 200), "Decoding the evaluation images (64/200)", 0.32),
    (ProgressEvent(Stage.GREEDY, 12, 10), "Budgeted search (10/10)", 1.0),
])
def test_each_event_reads_as_one_line(event: ProgressEvent, text: str, fraction: float | None) -> None:
    assert event.describe() == text
    assert event.fraction == (pytest.approx(fraction) if fraction is not None else None)


def test_every_stage_has_words_and_only_long_work_gives_way() -> None:
    assert all(stage.title and stage.title[0].isupper() for stage in Stage)
    assert {s for s in Stage if s.long} == {Stage.PRIORITY, Stage.GREEDY, Stage.BACK_OFF, Stage.SENSITIVITY,
                                             Stage.PROPAGATION, Stage.FINETUNE, Stage.LATENCY}
    with pytest.raises(ValueError):
        Stage("decode some images")
