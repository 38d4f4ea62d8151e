"""Model kind `conv_reconstruction_mse`: a temporal convolutional autoencoder scored by its reconstruction error.

The model convolves over time (1-D convolutions along the window, the tags as channels), so a filter
learns a short shape that recurs anywhere in the window, where the dense autoencoder learns each
position apart. The published SKAB leader (Conv-AE) is of this family. The score and each tag's share
are the dense autoencoder's arithmetic (autoencoder.ReconstructionScorer): only the model differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_agent.scoring.autoencoder import ReconstructionScorer
from edge_agent.scoring.base import F32, ScorerPlugin, Trained

if TYPE_CHECKING:
    from edge_agent.scoring.train import TrainOptions

KERNEL = 3  # samples per filter: a short shape; two stride-2 layers see 7 samples of the input
STRIDES = 4  # two stride-2 convolutions: the window is padded to a multiple of this, and cropped back


def fit_conv(tf: Any, windows: F32, options: TrainOptions) -> Trained:
    """Conv1D encoder (hidden, then bottleneck filters, each halving time), mirrored by upsampling + Conv1D."""
    layers = tf.keras.layers
    n_in = len(options.inputs)
    pad = -options.window % STRIDES
    # the decoder upsamples (repeats each step) and convolves: as int8 TFLite this runs about twice as
    # fast at batch 1 as Conv1DTranspose, whose int8 kernel is not XNNPACK-accelerated (measured, 10 vs 20 µs)
    convs = [
        layers.Conv1D(options.hidden, KERNEL, strides=2, padding="same", activation="relu"),
        layers.Conv1D(options.bottleneck, KERNEL, strides=2, padding="same", activation="relu"),
        layers.UpSampling1D(2),
        layers.Conv1D(options.hidden, KERNEL, padding="same", activation="relu"),
        layers.UpSampling1D(2),
        layers.Conv1D(n_in, KERNEL, padding="same"),
    ]
    # no pad layers when the window already fits: each would be one more op per window at run time
    padded = [layers.ZeroPadding1D((0, pad)), *convs, layers.Cropping1D((0, pad))] if pad else convs
    model = tf.keras.Sequential([layers.Input(shape=(options.window, n_in)), *padded])
    model.compile(optimizer=tf.keras.optimizers.Adam(options.learning_rate), loss="mse")
    history = model.fit(windows, windows, epochs=options.epochs, batch_size=options.batch_size, shuffle=True, verbose=0)
    latent = (options.window + pad) // STRIDES
    return Trained(
        model=model,
        final_loss=float(history.history["loss"][-1]),
        architecture=f"temporal conv autoencoder {options.window}×{n_in} → conv{KERNEL}/2 {options.hidden} → "
        f"conv{KERNEL}/2 {options.bottleneck} ({latent}×{options.bottleneck} latent) → "
        f"up2 conv{KERNEL} {options.hidden} → up2 conv{KERNEL} {n_in}",
    )


PLUGIN = ScorerPlugin(
    key="conv_reconstruction_mse",  # stored in every bundle of this kind: never rename it
    scorer=ReconstructionScorer,
    summary="temporal convolutional autoencoder, score = mean squared reconstruction error",
    fit=fit_conv,
)
