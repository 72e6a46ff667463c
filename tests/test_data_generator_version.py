"""Generated benchmarks are deterministic for a seed; these fingerprints were computed once
and written here. If a change to a generator moves them, bump its GENERATOR_VERSION (so
cached copies made by the old code are regenerated) and update the value here."""

import hashlib

from e2kd.data import tuxbirds as tb
from e2kd.data import tuxscenes as ts


def _fingerprint(parts):
    h = hashlib.sha256()
    for split in sorted(parts):
        for key in sorted(parts[split]):
            h.update(parts[split][key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_tuxbirds_fingerprint():
    assert tb.GENERATOR_VERSION == 2, "version bumped: recompute the fingerprint below"
    parts = tb.generate_tuxbirds(image_size=24, seed=0, counts={"train": 4, "test": 4})
    assert _fingerprint(parts) == "719404f9381018a3"


def test_tuxscenes_fingerprint():
    assert ts.GENERATOR_VERSION == 2, "version bumped: recompute the fingerprint below"
    parts = ts.generate_tuxscenes(image_size=24, seed=0, counts={"train": 4, "test": 4})
    assert _fingerprint(parts) == "f6aeea2ff55b29b6"
