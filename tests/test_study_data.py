"""How the study's options reach its config."""

from __future__ import annotations

from groupnorm.study.runner import PRESETS, with_overrides


def test_train_size_is_the_studys_not_the_trainers() -> None:
    # "train_size" starts like the train_<name> overrides of TrainConfig, yet is StudyConfig's.
    cfg = with_overrides(PRESETS["tiny"], train_size=100, train_epochs=3)
    assert (cfg.train_size, cfg.train.epochs) == (100, 3)
