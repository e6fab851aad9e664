"""Every workaround for a third-party quirk lives here: version range, symptom, removal condition.

Each has a test in tests/test_compat.py that tells us when upstream changed.
"""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_peft_custom_layer_warning():
    """PEFT (0.12 - at least 0.21) warns "Unsupported layer type ... proceed at your own risk" for every
    layer registered through `LoraConfig._register_custom_module`, although that is the documented hook.
    Our quantized layers expose in_features/out_features, which is all PEFT reads. Remove when PEFT stops
    warning for registered custom modules."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*qshard\.quant")
        yield
