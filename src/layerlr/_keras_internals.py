"""Private Keras internals layerlr relies on (placeholder, completed below)."""

from keras.src.saving.keras_saveable import KerasSaveable  # noqa: F401
