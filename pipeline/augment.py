"""Training augmentation, all of it: the paper's random 224x224 crop, horizontal reflection and PCA lighting (§4.1).

Each augmentation is three things, all in this file:
- a field of `TrainInputs`, the batch the training source hands DALI: the field's name is the DALI input's name,
  its metadata the input's type (`pipelines.read_source` declares and reads the inputs from these fields);
- a draw in `Augment.inputs`, in numpy, from (seed, epoch, step) alone and for the whole global batch, so that a
  sample gets the same values on any number of ranks (a new draw goes after the others: theirs stay the same);
- an operation in `apply`, the DALI side, which the `train` pipeline runs on the step's inputs.

The lighting shift and the mean are folded into one per-channel `offset` here (`Augment.offset`), which
crop_mirror_normalize subtracts in the same pass as the crop and the reflection.
"""
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data import CROP, SIZE

if TYPE_CHECKING:
    from pipeline.order import GlobalOrder

OFFSETS = SIZE - CROP  # 32: a crop may start at 0..32 in x and y


def dali_input(dtype: str, ndim: int):
    """A TrainInputs field: one DALI input of `dtype` elements with `ndim` dimensions per sample."""
    return field(metadata={"dtype": np.dtype(dtype), "ndim": ndim})


@dataclass(frozen=True, eq=False)  # fields are arrays: no element-wise __eq__
class TrainInputs:
    """One step's batch of one rank as DALI receives it, one field per input (per sample: the first axis).

    The training source fills the fields with numpy arrays; in the pipeline the same names hold DALI's data nodes.
    """
    jpegs: list = dali_input("uint8", 1)  # each sample's JPEG file (a view of the batch's read buffer)
    labels: np.ndarray = dali_input("int32", 0)  # [b]
    positions: np.ndarray = dali_input("int32", 0)  # [b]: each sample's place in its split (its .pos member)
    crop: np.ndarray = dali_input("float32", 1)  # [b, 2]: the window's normalised (x, y) anchor, k/32, k in 0..32
    mirror: np.ndarray = dali_input("int32", 0)  # [b]: 1 = reflect horizontally (p = 0.5)
    offset: np.ndarray = dali_input("float32", 1)  # [b, 3]: subtracted per channel after the mean (Augment.offset)

    def outputs(self) -> tuple:
        """The fields in their order: what DALI's external_source takes from its callback."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, eq=False)
class Augment:
    """What the draws and the offset need besides (seed, epoch, step); pickled into the reader workers with the
    source (numpy only, no DALI, no torch)."""
    sigma: float  # of the PCA lighting coefficients, alpha ~ N(0, sigma^2) per image and channel (0: no lighting)
    lighting: np.ndarray  # float64 [3, 3]: alpha -> RGB shift on the 0-255 scale
    rgb_mean: np.ndarray | None  # float32 [3], 0-255, in the offset; None: the pipeline subtracts the per-pixel mean

    @classmethod
    def of(cls, sigma: float, stats, mean: str) -> "Augment":
        """The augmentation for lighting `sigma`, the training set's `stats` (data.Stats) and the `mean` subtracted
        ("pixel" | "channel").

        The shift is `eigvec @ (alpha * eigval) * 255`: fb.resnet.torch's reading of §4.1 (eigenvalues scale alpha),
        on the 0-255 scale of the pixels (the statistics are on [0, 1]).
        """
        lighting = (np.asarray(stats.pca_eigvec, np.float64) * np.asarray(stats.pca_eigval, np.float64)).T * 255
        rgb_mean = np.asarray(stats.rgb_mean, np.float32) if mean == "channel" else None
        return cls(float(sigma), lighting, rgb_mean)

    def inputs(self, order: "GlobalOrder", epoch: int, step: int, jpegs, labels, positions) -> TrainInputs:
        """The step's samples, read, with this rank's part of the global batch's draws: the same values for a
        sample on any number of ranks."""
        rng = np.random.default_rng([order.seed, epoch, step, 1])
        batch, part = order.batch_size, order.places_in_batch
        offsets = rng.integers(0, OFFSETS + 1, size=(2, batch))
        mirror = rng.integers(0, 2, size=batch)
        alpha = rng.normal(0.0, self.sigma, size=(batch, 3)) if self.sigma > 0 else np.zeros((batch, 3))
        crop = np.stack(offsets[:, part] / OFFSETS, 1).astype(np.float32)
        return TrainInputs(jpegs=jpegs, labels=labels, positions=positions, crop=crop,
                           mirror=mirror[part].astype(np.int32), offset=self.offset(alpha[part].astype(np.float32)))

    def offset(self, alpha: np.ndarray) -> np.ndarray:
        """float32 [b, 3]: what crop_mirror_normalize subtracts per channel after the per-pixel mean: the lighting
        shift, negated (it is added), and the RGB mean where that is the mean subtracted."""
        shift = (alpha.astype(np.float64) @ self.lighting).astype(np.float32)
        return -shift if self.rgb_mean is None else self.rgb_mean - shift


def apply(inputs: TrainInputs, processing):
    """The DALI operations on a step's inputs (data nodes): the 224x224 window at `crop`, reflected where `mirror`,
    minus the mean and `offset`, in one crop_mirror_normalize pass (pipelines.patch)."""
    from pipeline.pipelines import patch  # DALI: imported where the pipeline is built, not where the source runs

    return patch(inputs.jpegs, processing, inputs.crop[0], inputs.crop[1], mirror=inputs.mirror,
                 offset=inputs.offset)
