"""Model kind `reconstruction_mse`: an autoencoder scored by its mean squared reconstruction error.

A window's score is the mean of (x − model(x))² over its good cells, in normalised units; a tag's
contribution is its share of that error. The training hook is the dense autoencoder of `edge-agent train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.base import F32, F64, ScorerPlugin, Trained
from edge_agent.scoring.bundle import Bundle
from edge_agent.scoring.runtime import ModelRuntime

if TYPE_CHECKING:
    from edge_agent.scoring.train import TrainOptions


class ReconstructionScorer:
    """Mean squared reconstruction error per window, and each tag's share of it."""

    def __init__(self, bundle: Bundle, runtime: ModelRuntime) -> None:
        self.runtime = runtime

    def score(self, x: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """See base.Scorer; missing cells are left out of the error."""
        # few, in-place numpy steps: at batch 1 the Python around the invoke is the real cost
        d = self.runtime.run(x)
        np.subtract(x, d, out=d)
        np.multiply(d, d, out=d)
        if good is None:
            # float32 sums of at most a few thousand squared errors: precise enough for a score
            per_tag = np.add.reduce(d, axis=1).astype(np.float64)  # batch × inputs
            per_tag *= 1.0 / d.shape[1]
            total = np.add.reduce(per_tag, axis=1)
            scores = total / per_tag.shape[1]
        else:
            d *= good
            n_good = good.sum(axis=1)
            per_tag = d.sum(axis=1, dtype=np.float64) / np.maximum(n_good, 1)
            total = per_tag.sum(axis=1)
            scores = d.sum(axis=(1, 2), dtype=np.float64) / np.maximum(n_good.sum(axis=1), 1)
        total[total <= 0] = 1.0
        per_tag /= total[:, None]
        return scores, per_tag


def fit_dense(tf: Any, windows: F32, options: TrainOptions) -> Trained:
    """The dense autoencoder window·inputs → hidden → bottleneck → hidden → window·inputs, fitted on MSE."""
    n_in = len(options.inputs)
    shape = (options.window, n_in)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=shape),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(options.hidden, activation="relu"),
            tf.keras.layers.Dense(options.bottleneck, activation="relu"),
            tf.keras.layers.Dense(options.hidden, activation="relu"),
            tf.keras.layers.Dense(options.window * n_in),
            tf.keras.layers.Reshape(shape),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(options.learning_rate), loss="mse")
    history = model.fit(windows, windows, epochs=options.epochs, batch_size=options.batch_size, shuffle=True, verbose=0)
    return Trained(
        model=model,
        final_loss=float(history.history["loss"][-1]),
        architecture=f"dense autoencoder {options.window * n_in}-{options.hidden}-{options.bottleneck}-"
        f"{options.hidden}-{options.window * n_in}",
    )


PLUGIN = ScorerPlugin(
    key="reconstruction_mse",  # shipped bundles carry this key: never rename it
    scorer=ReconstructionScorer,
    summary="autoencoder, score = mean squared reconstruction error",
    fit=fit_dense,
)
