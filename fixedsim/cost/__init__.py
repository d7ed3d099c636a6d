"""The cost model: counts without running, machine profiles, time per layer and epoch.

- :mod:`fixedsim.cost.counts`: by shape alone, what a step of a model under a policy
  does (MACs by format, roundings, bytes per tensor), equal to what the counters record;
- :mod:`fixedsim.cost.profiles`: machine profiles (peak multiply-accumulate rate per native
  format, bandwidth, caches, per-call overhead), published ones with their sources, and
  :func:`calibrate` for the machine it runs on;
- :mod:`fixedsim.cost.model`: time = max(compute, memory) + overhead per layer and product,
  summed over an epoch (:func:`predict`);
- :mod:`fixedsim.cost.validate`: the prediction against native PyTorch runs.

See docs/cost.md.
"""

from .counts import CountError, Row, StepCounts, count_epoch, count_step, tensor_bytes
from .model import COLUMNS, Prediction, predict
from .profiles import PUBLISHED, Profile, ProfileError, calibrate, load_profile, native_class

__all__ = ["COLUMNS", "CountError", "PUBLISHED", "Prediction", "Profile", "ProfileError", "Row",
           "StepCounts", "calibrate", "count_epoch", "count_step", "load_profile",
           "native_class", "predict", "tensor_bytes"]
