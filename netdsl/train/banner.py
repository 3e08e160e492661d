"""The lines `netdsl train` opens with: what is trained, on what, where, and how."""

from __future__ import annotations


def banner(trainer) -> str:
    """The opening lines of a `Trainer`'s run (netdsl.train.loop): the net, the data, the devices and
    processes, then the recipe's shape: the optimizer, the batch, what changes the step (parts, recompute,
    an average of the weights, mixed images, scale jittering, random-resized crops), the length, the
    schedule and the run folder."""
    recipe = trainer.recipe
    devices = ", ".join(f"{name}->{device}" for name, device in trainer.module.devices.items())
    where = f"{trainer.world.size} processes" if trainer.world.distributed else "1 process"
    val = len(trainer.data.val) if trainer.data.val is not None else 0
    epochs = trainer.total_epochs
    sizes, area = trainer.data.augment.sizes, trainer.data.augment.area
    return (
        f"training {trainer.graph.graph['name']} ({trainer.net_path}) on {len(trainer.data.train):,} images, "
        f"validating on {val:,}; {len(trainer.data.classes)} classes; {devices}; {where}\n"
        f"  {recipe.optimizer} lr {recipe.lr:g}, batch {recipe.batch}"
        + (f" (in {recipe.accumulate} parts of {trainer.part_batch})" if recipe.accumulate > 1 else "")
        + (f", recompute {recipe.recompute}" if recipe.recompute != "none" else "")
        + (f", validating and saving an average of the weights (ema {recipe.ema:g})" if recipe.ema else "")
        + trainer.mixing.describe()
        + (
            f", each training image scaled to {sizes[0]}..{sizes[1]} (validation {trainer.data.preprocess.size})"
            if sizes
            else ""
        )
        + (f", random-resized crops of {area[0]:.0%}..{area[1]:.0%} of each image's area" if area else "")
        + f", {epochs} epoch{'' if epochs == 1 else 's'} ({trainer.total_steps:,} steps"
        + (f"; fewer if {recipe.early_stop} validated in a row do not improve" if recipe.early_stop else "")
        + f"), schedule {recipe.schedule}, {recipe.dtype}; run folder {trainer.run.path}"
        + (f"; resuming at step {trainer.step}" if trainer.step else "")
    )
