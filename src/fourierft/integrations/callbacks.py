"""``transformers.Trainer`` callbacks: :class:`SpectrumLRCallback` tells the user when a FourierFT spectrum's
learning rate is far too small to move its layer (:mod:`fourierft.integrations.spectrum_lr`)."""

from __future__ import annotations

from transformers.trainer_callback import TrainerCallback

from .spectrum_lr import optimizer_lr_of, warn_slow_spectra


class SpectrumLRCallback(TrainerCallback):
    """Warns once, when training starts, if the optimizer gives a FourierFT spectrum a learning rate ten or
    more times below what its layer needs (``UserWarning`` naming the layer, the learning rate and the one it
    would need).

    :class:`~fourierft.AdapterTrainer` installs it; with the stock ``transformers.Trainer`` add it yourself::

        trainer = Trainer(model=peft_model, args=args, train_dataset=train, callbacks=[SpectrumLRCallback()])

    The learning rate checked is each parameter group's peak (``initial_lr`` once a scheduler is attached), so
    warm-up does not trigger it.
    """

    def __init__(self) -> None:
        self.warned = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Check the optimizer's learning rates against the model's FourierFT layers (once per callback)."""
        if self.warned or model is None or optimizer is None:
            return
        self.warned = warn_slow_spectra(model, optimizer_lr_of(optimizer))
