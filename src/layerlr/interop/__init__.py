"""Interop: the same rules in other training set-ups.

Keras ``MultiOptimizer`` routed by selectors (`_multi`), TF1 graph-mode
``minimize`` (`_compat_v1`) and Caffe ``lr_mult``/``decay_mult`` (`_caffe`).
"""
