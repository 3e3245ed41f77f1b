"""Warming the prior bank (``studio priors fill``, the console's button): the tiny model's bank is painted,
shared through storage with its row, and a second fill paints nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.models import PriorBank
from app.operator.service import PriorFillRefused
from worker.tasks.engine_adapter import ModelLike
from worker.tasks.priors import DiffusersPriorFiller, fill_priors, model_spec
from worker.tasks.runtime import WorkerContext


class LoadOnce(DiffusersPriorFiller):
    """The real filler, loading the model once for the test's two fills."""

    def __init__(self) -> None:
        self.loaded: dict[str, ModelLike] = {}

    def load_model(self, spec: str) -> ModelLike:
        if spec not in self.loaded:
            self.loaded[spec] = super().load_model(spec)
        return self.loaded[spec]


def test_a_fill_paints_the_missing_images_and_shares_them(ctx: WorkerContext) -> None:
    ctx.settings = ctx.settings.model_copy(update={"prior_steps": 2})
    filler = LoadOnce()
    first = fill_priors(ctx, filler, "tiny", " Dog ", 1)
    assert (first.spec, first.class_noun, first.generated, first.reused) == ("tiny", "dog", 1, 0)
    with ctx.sessions() as session:
        bank = session.scalars(select(PriorBank)).one()
    assert bank.image_count == 1 and bank.class_prompt == "a photo of a dog"
    assert len([key for key in ctx.storage.list(bank.storage_prefix) if key.endswith(".png")]) == 1
    ctx.settings.resolved_prior_cache_dir.joinpath(bank.key, "00000.png").unlink()  # this worker's cache lost one
    again = fill_priors(ctx, filler, "tiny", "dog", 1)
    assert (again.generated, again.reused) == (0, 1)  # pulled back from storage, not painted


def test_bad_requests_are_named_before_any_model_loads(ctx: WorkerContext) -> None:
    with pytest.raises(PriorFillRefused, match="The class must be a noun"):
        fill_priors(ctx, DiffusersPriorFiller(), "tiny", "dog; rm -rf", 2)
    with pytest.raises(PriorFillRefused, match="between 1 and 1000"):
        fill_priors(ctx, DiffusersPriorFiller(), "tiny", "dog", 0)
    # A key of the offered models names its spec; anything else is a spec itself.
    assert model_spec(ctx.settings.model_copy(update={"base_model": "tiny-sdxl"}), "") == "tiny-sdxl"
    assert model_spec(ctx.settings, "tiny-zimage") == "tiny-zimage"
