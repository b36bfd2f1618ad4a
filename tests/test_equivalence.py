"""Each variable trains exactly as if by the same optimizer at lr*m, wd*dm.

The reference is one separately configured optimizer per multiplier group
(`helpers.reference_optimizer`), trained through `model.fit` on a twin model.
"""

import pytest
import keras

import layerlr
from helpers import (
    data, gradients, hand_multipliers, max_abs_diff, reference_optimizer, twin_models, wrapped,
)


class UserAdam(keras.optimizers.Adam):
    """A user subclass: on torch it skips the fused path and uses update_step."""


WD = 0.02
OPTIMIZERS = {
    "sgd_nesterov": (keras.optimizers.SGD, dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=WD)),
    "sgd_clipnorm": (keras.optimizers.SGD, dict(learning_rate=0.05, clipnorm=0.1)),
    "adam": (keras.optimizers.Adam, dict(learning_rate=0.01, weight_decay=WD)),
    "adam_amsgrad": (keras.optimizers.Adam, dict(learning_rate=0.01, amsgrad=True)),
    "adamw": (keras.optimizers.AdamW, dict(learning_rate=0.01, weight_decay=0.05)),
    "adamax": (keras.optimizers.Adamax, dict(learning_rate=0.01, weight_decay=WD)),
    "nadam": (keras.optimizers.Nadam, dict(learning_rate=0.01, weight_decay=WD)),
    "rmsprop_centered": (keras.optimizers.RMSprop, dict(learning_rate=0.01, momentum=0.5, centered=True, weight_decay=WD)),
    "adagrad": (keras.optimizers.Adagrad, dict(learning_rate=0.05, weight_decay=WD)),
    "adadelta": (keras.optimizers.Adadelta, dict(learning_rate=1.0, weight_decay=WD)),
    "adafactor": (keras.optimizers.Adafactor, dict(learning_rate=0.01, weight_decay=WD)),
    "ftrl": (keras.optimizers.Ftrl, dict(learning_rate=0.05, beta=0.1, l2_regularization_strength=0.01)),
    "lion": (keras.optimizers.Lion, dict(learning_rate=0.002, weight_decay=WD)),
    "lamb": (keras.optimizers.Lamb, dict(learning_rate=0.01, weight_decay=WD)),
    "muon": (keras.optimizers.Muon, dict(learning_rate=0.01, weight_decay=WD, adam_weight_decay=0.01)),
    "schedule_free_adamw": (keras.optimizers.ScheduleFreeAdamW, dict(learning_rate=0.01, weight_decay=WD)),
    "user_subclass": (UserAdam, dict(learning_rate=0.01, weight_decay=WD)),
}


def fit_both(opt_class, kwargs, epochs=2, **compile_kwargs):
    model, reference = twin_models()
    untouched = keras.models.clone_model(model)
    untouched.set_weights(model.get_weights())
    x, y = data()
    model.compile(optimizer=wrapped(opt_class, kwargs), loss="mse", **compile_kwargs)
    reference.compile(
        optimizer=reference_optimizer(opt_class, kwargs, hand_multipliers),
        loss="mse",
        **compile_kwargs,
    )
    for m in (model, reference):
        m.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model, reference, untouched


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_one_optimizer_per_group(name):
    opt_class, kwargs = OPTIMIZERS[name]
    model, reference, plain = fit_both(opt_class, kwargs)
    assert max_abs_diff(model, reference) < 1e-6

    # Teeth: the same optimizer without multipliers ends somewhere else.
    x, y = data()
    plain.compile(optimizer=opt_class(**kwargs), loss="mse")
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(model, plain) > 1e-4


def test_schedule_and_jit_compile():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=2, decay_rate=0.5)
    model, reference, _ = fit_both(
        keras.optimizers.AdamW, dict(learning_rate=schedule, weight_decay=0.1), jit_compile=True
    )
    assert max_abs_diff(model, reference) < 1e-6


def test_multiplier_one_everywhere_is_bit_identical_to_the_plain_optimizer():
    model, plain = twin_models()
    x, y = data()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    for m in (model, plain):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(model, plain) == 0.0


def _adam_with_scaled_gradients(model, x, y, lr_of_path):
    """The popular workaround: scale each gradient by its lr_mult (wrong for Adam)."""
    opt = keras.optimizers.Adam(0.01)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    mults = [lr_of_path(v.path)[0] for v in model.trainable_variables]
    for start in range(0, len(x), 16):
        xb, yb = x[start:start + 16], y[start:start + 16]
        grads = gradients(model, xb, yb)
        opt.apply([g * m for g, m in zip(grads, mults)], model.trainable_variables)


def test_gradient_scaling_fails_the_equivalence_test_for_adam():
    """The equivalence test has teeth: the gradient-scaling trick does not pass it."""
    model, reference, scaled = fit_both(keras.optimizers.Adam, dict(learning_rate=0.01), epochs=1)
    x, y = data()
    _adam_with_scaled_gradients(scaled, x, y, hand_multipliers)
    assert max_abs_diff(model, reference) < 1e-6
    assert max_abs_diff(scaled, reference) > 1e-3
