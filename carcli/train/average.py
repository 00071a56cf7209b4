"""Weight averaging of checkpoints that share an architecture (a "model soup").

Fine-tunes that start from one another end near each other in weight space;
their uniform average often validates better than any of them (Izmailov et
al. 2018, SWA; Wortsman et al. 2022, model soups). Our training runs are
short warm restarts from the previous shipped weights, so the shipped
checkpoints of the last few runs are natural ingredients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from carcli.checkpoints import WeightsError, file_digest, load_checkpoint
from carcli.models import CARModel

# Metadata an average inherits only if every ingredient agrees on it.
SHARED_KEYS = ("training_data",)
# Ingredient metadata worth keeping in the average's record.
INGREDIENT_KEYS = ("source", "steps", "recipe", "validation")


def average_checkpoints(paths: Sequence[Path]) -> tuple[CARModel, dict]:
    """Uniform average of carcli checkpoints; returns (model in eval, metadata).

    Sums run in float64 so the result does not depend on the order of the
    files. Every file must describe the same network (same config), else a
    WeightsError names the first one that differs. The last ``cpu_timing``
    among the ingredients is kept: the averaged network costs what each one does.
    """
    if len(paths) < 2:
        raise WeightsError("averaging needs at least two checkpoints")
    total: dict[str, torch.Tensor] = {}
    ingredients = []
    shared: dict[str, object] = {}
    first_model: CARModel | None = None
    timing = None
    for path in map(Path, paths):
        model, meta = load_checkpoint(path)
        if first_model is None:
            first_model = model
            shared = {k: meta.get(k) for k in SHARED_KEYS}
        elif model.config != first_model.config:
            raise WeightsError(
                f"{path} is a different network ({model.config.name}, {model.config.scale}x) "
                f"from {paths[0]} ({first_model.config.name}, {first_model.config.scale}x); "
                f"only checkpoints of one architecture can be averaged"
            )
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                raise WeightsError(f"{path}: {key} is not a floating-point tensor")
            total[key] = total.get(key, 0) + value.double()
        shared = {k: v for k, v in shared.items() if meta.get(k) == v}
        timing = meta.get("cpu_timing", timing)
        record = {"file": path.name, "sha256": file_digest(path)}
        record.update({k: meta[k] for k in INGREDIENT_KEYS if k in meta})
        ingredients.append(record)

    assert first_model is not None
    averaged = {k: (v / len(paths)).to(torch.float32) for k, v in total.items()}
    first_model.load_state_dict(averaged)
    metadata: dict = {k: v for k, v in shared.items() if v is not None}
    metadata["source"] = f"carcli average of {len(paths)} checkpoints"
    metadata["recipe"] = {"method": "uniform weight average", "ingredients": ingredients}
    metadata["parameters"] = first_model.parameter_counts()
    if timing is not None:
        # Same network, same cost: the last measurement among the inputs stands until re-measured.
        metadata["cpu_timing"] = timing
    return first_model.eval(), metadata
